"""The explorer: one offline HTML page to look at a model's training, feature maps and search.

:func:`write_explorer` writes a single file that works from ``file://`` with no server and no
network request: the data (pictures, feature maps as compressed bytes, neighbours, a 2-D
projection) sits inline as JSON and a small vanilla script (``explorer.js``, shipped beside this
module) draws it. ``featurescope demo`` ends by writing one with the study's wording (test
images searching training images); ``featurescope explore`` writes one for any saved
:class:`~featurescope.ImageSearch`, speaking of the folder's own files.

The page has a stable contract for tests: each query thumbnail carries
``data-fs-query="<query index>"``, each neighbour shown ``data-fs-neighbour="<gallery id>"``,
each channel choice ``data-fs-channel="<stage node>:<channel>"``, each training run
``data-fs-run="<name>"`` and each projected point ``data-fs-point="<gallery id>"``;
:func:`read_explorer_data` returns the page's data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurescope._io import atomic_open
from featurescope._version import __version__
from featurescope.errors import FeaturescopeError
from featurescope.index import retrieval_metrics
from featurescope.study import _explorer_data as pack
from featurescope.study._explorer_page import metric_rows, parse, render
from featurescope.study._search import ImageSearch, weights_sentence
from featurescope.zoo.metadata import model_metadata, model_name

__all__ = ["explore_index", "query_images", "read_explorer_data", "write_explorer"]

PathLike = str | os.PathLike[str]

#: Side in pixels of the feature-map canvases and of each query's picture.
DISPLAY_SIZE = pack.DISPLAY_SIZE


def _project(vectors: torch.Tensor, method: str) -> tuple[str, np.ndarray[Any, Any]]:
    x = vectors.double()
    if method in ("auto", "umap") and len(x) > 15:
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            if method == "umap":
                raise FeaturescopeError(
                    "projection='umap' needs umap-learn: pip install 'featurescope[umap]'"
                ) from None
        else:
            reducer = umap.UMAP(n_components=2, random_state=0)
            return "UMAP", np.asarray(reducer.fit_transform(x.numpy()))
    centred = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return "PCA", (centred @ vh[:2].T).numpy()


def _hits(distances: torch.Tensor, ids: torch.Tensor) -> list[list[list[Any]]]:
    return [
        [[int(i), round(float(d), 5)] for d, i in zip(drow, irow, strict=True) if int(i) >= 0]
        for drow, irow in zip(distances.tolist(), ids.tolist(), strict=True)
    ]


def _runs(runs: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    out = []
    for name, history in (runs or {}).items():
        h = history.to_dict() if hasattr(history, "to_dict") else dict(history)
        out.append(
            {
                "name": name,
                **{
                    k: list(h.get(k, []))
                    for k in ("train_loss", "val_loss", "train_acc", "val_acc")
                },
            }
        )
    return out


def _wording(search: ImageSearch, splits: tuple[str, str] | None) -> dict[str, str]:
    """How the page names its queries and its gallery: the study's splits, or the folder."""
    if splits is not None:
        query, gallery = splits
        return {
            "query": f"{query} image",
            "queries": f"{query} images",
            "a_query": f"a {query} image",
            "gallery": f"{gallery} images",
        }
    where = f"images of {search.root.name}/" if search.root is not None else "indexed images"
    return {"query": "image", "queries": "query images", "a_query": "an image", "gallery": where}


def _no_cam_reason(search: ImageSearch, names: list[str] | None) -> str:
    if names is not None:
        return "No Grad-CAM: this model has no spatial map to explain its class scores."
    if search.weights == "random":
        return (
            "No Grad-CAM and no class shown: the classifier head is untrained (random "
            "weights), so its class scores mean nothing."
        )
    return (
        "No Grad-CAM and no class shown: the classifier head's classes are not known (a "
        "checkpoint without class names, or a new head on pretrained weights)."
    )


def _exclusions(search: ImageSearch, own: list[int | None]) -> torch.Tensor:
    """``[nq, 1]`` ids to leave out: each query's own gallery id, else one that is no id."""
    nobody = int(search.index.ids.min()) - 1
    return torch.tensor([[nobody if i is None else i] for i in own], dtype=torch.int64)


def write_explorer(
    out: PathLike,
    search: ImageSearch,
    queries: Sequence[PathLike],
    *,
    query_labels: Sequence[int] | None = None,
    runs: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    k: int = 10,
    stages: Sequence[str] | None = None,
    projection: str = "auto",
    max_points: int = 2000,
    max_map_images: int = 40,
    max_channels: int = pack.MAX_CHANNELS,
    title: str = "featurescope explorer",
    splits: tuple[str, str] | None = None,
    keep_self: bool = False,
    batch_size: int = 16,
    similarity: Mapping[str, Any] | None = None,
) -> Path:
    """Write the explorer page of ``search`` queried by ``queries`` to the file ``out``.

    Images are named by their path below the gallery's root (else their file name) and by
    their class folder where there are classes. A query that is itself in the gallery (the same
    file) is left out of its own neighbours unless ``keep_self``. The predicted class and its
    Grad-CAM are shown only for a trained head (weights that are not random, with known
    classes); the page's header says where the weights came from.

    Args:
        out: the HTML file to write (atomically).
        search: the model and the gallery index.
        queries: query image files; those that cannot be read are left out and named on the
            page.
        query_labels: their labels, in ``search.class_names`` order, to mark hits and score
            precision@k and mAP@R; ``-1`` or ``None`` for unlabelled.
        runs: ``{run name: History}`` (or its ``to_dict()``) for the training curves.
        metrics: ``{row name: retrieval_metrics(...)}`` for the table; default: this
            search's own scores, when the queries are labelled.
        k: neighbours shown per query.
        stages: nodes whose feature maps are shown (default: the zoo model's stages).
        projection: ``"auto"`` (UMAP when umap-learn is installed, else PCA), ``"pca"``,
            ``"umap"``.
        max_points: gallery images projected at most (evenly spaced beyond that).
        max_map_images: queries whose feature maps and Grad-CAM the page carries at most.
        max_channels: channels of each stage the page carries, the strongest first (each
            stage's maps are also average-pooled to at most 32 pixels a side).
        title: the page's title.
        splits: the names of the query and gallery sets, e.g. the study's
            ``("test", "training")``; default: the page speaks of the folder's images.
        keep_self: keep a query that is in the gallery among its own neighbours (at rank 1,
            distance 0).
        batch_size: images per forward pass.
        similarity: representation similarity to show as node × node tables with hover
            values: ``{"comparisons": [{"name", "nodes_a", "nodes_b", "matrix",
            "estimators"}, ...], "num_images": ...}`` (what the demo's
            ``compare_width_representations`` returns, or :meth:`Comparison.to_dict
            <featurescope.compare.Comparison.to_dict>` entries).

    Returns:
        The path written.

    Raises:
        FeaturescopeError: no queries, none readable, or ``projection`` is unknown.

    Example:
        >>> import pathlib, tempfile, featurescope as fs
        >>> from featurescope.study import write_explorer
        >>> from featurescope.study.explorer import read_explorer_data
        >>> root = fs.data.make_synthetic_dataset(tempfile.mkdtemp(), train_per_class=2,
        ...                                       val_per_class=0, test_per_class=1, size=32)
        >>> search = fs.ImageSearch.build(fs.create_model("alexnet_half"), root, progress=False)
        >>> test = fs.data.ImageFolder(root / "test")
        >>> page = write_explorer(root / "explorer.html", search, test.paths,
        ...                       query_labels=test.targets, k=3)
        >>> data = read_explorer_data(page)
        >>> data["weights"], data["queries"][0]["name"], len(data["queries"][0]["neighbours"])
        ('random', 'circle_0000.png', 3)
    """
    if projection not in ("auto", "pca", "umap"):
        raise FeaturescopeError(f"projection must be 'auto', 'pca' or 'umap', got {projection!r}")
    paths = [str(p) for p in queries]
    if not paths:
        raise FeaturescopeError("the explorer needs at least one query image")
    labels = [int(v) for v in query_labels] if query_labels is not None else [-1] * len(paths)
    if len(labels) != len(paths):
        raise FeaturescopeError(f"{len(labels)} query labels for {len(paths)} queries")
    batch, kept, unreadable = pack.load_queries(search, paths)
    if batch is None:
        raise FeaturescopeError(
            f"none of the {len(paths)} query images could be read (first: {paths[0]!r})"
        )
    paths, labels = [paths[i] for i in kept], [labels[i] for i in kept]
    meta = model_metadata(search.model)
    names = pack.head_classes(search.model)
    analysis = pack.analyse(
        search,
        batch,
        list(stages) if stages is not None else list(meta.stage_nodes if meta else ()),
        trained_head=names is not None,
        max_map_images=max_map_images,
        max_channels=max_channels,
        batch_size=batch_size,
    )
    vectors = analysis.vectors
    own = search.gallery_ids(paths)
    exclude = None if keep_self or all(i is None for i in own) else _exclusions(search, own)
    if exclude is not None and len(search.index) > 1:
        k = min(k, len(search.index) - 1)  # a query in the gallery has one image fewer
    k = min(k, len(search.index))
    query_hits = _hits(*search.index.search(vectors, k, exclude_ids=exclude))
    projected = _projection(search, k, max_points, projection)
    if (
        metrics is None
        and all(label >= 0 for label in labels)
        and bool((search.index.labels >= 0).all())
    ):
        metrics = {
            "this model": retrieval_metrics(search.index, vectors, labels, k=k, exclude_ids=exclude)
        }
    pictures = [pack.model_view(t, search) for t in batch]
    queries_data = [
        {
            "path": path,
            "name": search.display_name(path),
            "id": own[i],
            "label": label,
            "predicted": analysis.predicted[i],
            "predicted_name": _class_name(names, analysis.predicted[i]),
            "image": i,
            "neighbours": hits,
            "cam": analysis.cams[i] if i < len(analysis.cams) else None,
        }
        for i, (path, label, hits) in enumerate(zip(paths, labels, query_hits, strict=True))
    ]
    points = [point[0] for point in projected["points"]]
    shown = query_hits + list(projected["neighbours"].values())
    data = {
        "title": title,
        "version": __version__,
        "model": model_name(search.model),
        "node": search.node,
        "weights": search.weights,
        "weights_sentence": weights_sentence(search.weights),
        "k": k,
        "exclude_self": not keep_self,
        "classes": list(search.class_names or []),
        "wording": _wording(search, splits),
        "display_size": pack.DISPLAY_SIZE,
        "runs": _runs(runs),
        "metrics": metric_rows(metrics),
        "notes": _notes(search, unreadable),
        "images": pictures,
        "queries": queries_data,
        "cam_node": analysis.cam_node,
        "cam_side": pack.CAM_SIDE,
        "no_cam_reason": _no_cam_reason(search, names),
        "gallery": _gallery(search, shown, points, own, pictures),
        "stages": analysis.stages,
        "projection": projected,
        "similarity": _similarity(similarity),
    }
    target = Path(out)
    with atomic_open(target, encoding="utf-8") as fh:
        fh.write(render(data))
    return target


def _similarity(similarity: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The comparisons the page draws as tables: plain names, nodes, values and estimators."""
    if not similarity:
        return []
    tables = []
    for entry in similarity.get("comparisons", []):
        nodes_a = list(entry.get("nodes_a") or similarity.get("stages") or [])
        nodes_b = list(entry.get("nodes_b") or similarity.get("stages") or [])
        matrix = [[None if v != v else float(v) for v in row] for row in entry["matrix"]]
        if len(matrix) != len(nodes_a) or any(len(row) != len(nodes_b) for row in matrix):
            raise FeaturescopeError(
                f"comparison {entry.get('name')!r}: a {len(matrix)}-row matrix for "
                f"{len(nodes_a)} × {len(nodes_b)} nodes"
            )
        tables.append(
            {
                "name": str(entry.get("name", "")),
                "model_a": str(entry.get("model_a", "")),
                "model_b": str(entry.get("model_b", "")),
                "nodes_a": nodes_a,
                "nodes_b": nodes_b,
                "matrix": matrix,
                "estimators": entry.get("estimators"),
                "num_images": similarity.get("num_images", entry.get("num_images")),
            }
        )
    return tables


def _class_name(names: list[str] | None, predicted: int | None) -> str | None:
    if names is None or predicted is None or predicted >= len(names):
        return None
    return names[predicted]


def _projection(search: ImageSearch, k: int, max_points: int, method: str) -> dict[str, Any]:
    """The gallery in 2-D (at most ``max_points``, evenly spaced) and each point's neighbours."""
    all_ids = search.index.ids
    step = max(1, -(-len(all_ids) // max_points))
    rows = torch.arange(0, len(all_ids), step)
    used, xy = _project(search.index.vectors[rows], method)
    point_ids = all_ids[rows].tolist()
    hits: list[list[list[Any]]] = [[] for _ in point_ids]
    if len(all_ids) > 1:
        around = search.index.search(
            search.index.vectors[rows],
            min(k, len(all_ids) - 1),
            exclude_ids=all_ids[rows][:, None],
        )
        hits = _hits(around.distances, around.ids)
    return {
        "method": used,
        "points": [
            [int(i), round(float(x), 5), round(float(y), 5)]
            for i, (x, y) in zip(point_ids, xy.tolist(), strict=True)
        ],
        "neighbours": {str(int(i)): h for i, h in zip(point_ids, hits, strict=True)},
    }


def _notes(search: ImageSearch, unreadable: list[str]) -> dict[str, str]:
    """What the page warns of: indexed images that are missing, queries that did not decode."""
    notes = {}
    missing = search.missing_summary()
    if missing:
        notes["missing"] = missing
    if unreadable:
        shown = ", ".join(Path(p).name for p in unreadable[:5])
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        notes["unreadable"] = (
            f"{len(unreadable)} query image(s) could not be read and are left out: {shown}{more}"
        )
    return notes


def _gallery(
    search: ImageSearch,
    shown: list[list[list[Any]]],
    points: list[int],
    own: list[int | None],
    pictures: list[str],
) -> list[dict[str, Any]]:
    """The gallery images the page shows (neighbours and projected points), each picture
    shipped once: a query's own picture serves for its gallery entry; a missing file gets
    ``"image": None``."""
    used = {i for hits in shown for i, _ in hits} | set(points)
    already = {gid: position for position, gid in enumerate(own) if gid is not None}
    where, by_id = search.image_paths(), search.labels()
    gallery = []
    for i in sorted(used):
        path = where.get(i)
        picture: int | None = already.get(i)
        if picture is None and path:
            url = pack.thumbnail(path)
            if url is not None:
                pictures.append(url)
                picture = len(pictures) - 1
        gallery.append(
            {
                "id": i,
                "label": by_id[i],
                "path": path,
                "name": search.display_name(path) if path else f"#{i}",
                "image": picture,
            }
        )
    return gallery


def read_explorer_data(page: PathLike) -> dict[str, Any]:
    """The data an explorer page carries (its ``<script id="fs-data">`` JSON), for tests and
    for tools that read the page back.

    Raises:
        FeaturescopeError: the file is not an explorer page.
    """
    data = parse(Path(page).read_text(encoding="utf-8"))
    if not data:
        raise FeaturescopeError(f"{os.fspath(page)!r} is not an explorer page (no fs-data)")
    return data


def query_images(
    images: PathLike, class_names: Sequence[str] | None = None, *, limit: int = 100
) -> tuple[list[str], list[int]]:
    """Image files under ``images`` (a folder, searched recursively, or one file), sorted, with
    labels: the index of the parent folder's name in ``class_names``, else ``-1``.

    At most ``limit`` files are taken, evenly spaced through the sorted list.

    Raises:
        EmptyDatasetError: no image file there.
    """
    from featurescope.data.folders import IMAGE_EXTENSIONS
    from featurescope.errors import EmptyDatasetError

    root = Path(images)
    suffixes = tuple(e.lower() for e in IMAGE_EXTENSIONS)
    files = (
        [root]
        if root.is_file()
        else sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    )
    if not files:
        raise EmptyDatasetError(f"no image files ({', '.join(suffixes)}) under {str(root)!r}")
    if len(files) > limit:
        files = [files[round(i * (len(files) - 1) / (limit - 1))] for i in range(limit)]
    lookup = {name: i for i, name in enumerate(class_names or [])}
    return [str(f) for f in files], [lookup.get(f.parent.name, -1) for f in files]


def explore_index(
    index: PathLike,
    images: PathLike | None = None,
    out: PathLike = "explorer.html",
    *,
    k: int = 10,
    queries: int = 40,
    root: PathLike | None = None,
    keep_self: bool = False,
) -> Path:
    """Write the explorer page of a saved :class:`~featurescope.ImageSearch`.

    Args:
        index: a folder written by :meth:`ImageSearch.save <featurescope.ImageSearch.save>` or
            ``featurescope index build``.
        images: the query images: a folder (class subfolders named as the index's classes
            mark hits and score precision) or one file; default: ``queries`` of the indexed
            images themselves (those whose files are there), evenly spaced.
        out: the HTML file to write.
        k: neighbours shown per query.
        queries: how many query images at most.
        root: where the indexed images are now, if their folder moved (see
            :meth:`ImageSearch.load <featurescope.ImageSearch.load>`).
        keep_self: keep a query that is in the gallery among its own neighbours.

    Returns:
        The page's path.

    Raises:
        FeaturescopeError: none of the indexed images is where the index says and no
            ``images`` are given (re-point the folder with ``root``).
    """
    search = ImageSearch.load(index, root=root)
    if images is not None:
        paths, labels = query_images(images, search.class_names, limit=queries)
    else:
        where, by_id = search.image_paths(), search.labels()
        present = [i for i in sorted(where) if where[i] and os.path.isfile(where[i] or "")]
        if not present:
            raise FeaturescopeError(
                f"none of the {len(where)} indexed images is there to query: "
                f"{search.missing_summary() or 'the index records no paths'}"
            )
        step = max(1, -(-len(present) // queries))
        picked = present[::step]
        paths, labels = [where[i] or "" for i in picked], [by_id[i] for i in picked]
    return write_explorer(
        out,
        search,
        paths,
        query_labels=labels,
        k=k,
        title=f"featurescope explorer: {Path(index).name}",
        keep_self=keep_self,
    )
