"""The explorer's data, built apart from any page: :func:`build_explorer_data`.

One :class:`~featurescope.FeatureTap` pass per batch of queries gives their embeddings, class
scores and stage maps together; Grad-CAM (a trained head only) needs its own backward. The
result is the plain structure :class:`~featurescope.pages.ExplorerData` that the static page,
the report and the app draw.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from featurescope._version import __version__
from featurescope.errors import FeaturescopeError
from featurescope.index import retrieval_metrics
from featurescope.pages import _analysis as analysis_
from featurescope.pages._encode import DISPLAY_SIZE, model_view, thumbnail
from featurescope.pages._projection import PROJECTIONS, project_2d
from featurescope.pages._schema import (
    ExplorerData,
    GalleryImage,
    Projection,
    Query,
    Run,
    SimilarityTable,
    Units,
    Wording,
)
from featurescope.pages._units import UnitsSpec, as_spec, build_units
from featurescope.pages._words import weights_sentence
from featurescope.zoo import model_metadata, model_name

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from featurescope.study import ImageSearch
    from featurescope.units import TopActivations

__all__ = ["build_explorer_data", "gallery_images", "metric_rows"]

PathLike = str | os.PathLike[str]

_METRIC_NAMES = {
    "precision_at_1": "precision@1",
    "precision_at_k": "precision@k",
    "recall_at_k": "recall@k",
    "r_precision": "R-precision",
    "mean_average_precision_at_r": "mAP@R",
}


def metric_rows(metrics: Mapping[str, Mapping[str, float]] | None) -> dict[str, dict[str, float]]:
    """``{row: {display name: value}}`` of retrieval scores, named as the page shows them.

    Example:
        >>> metric_rows({"trained": {"precision_at_1": 0.5, "mean_average_precision_at_r": 0.25}})
        {'trained': {'precision@1': 0.5, 'mAP@R': 0.25}}
    """
    return {
        row: {_METRIC_NAMES.get(key, key): value for key, value in values.items()}
        for row, values in (metrics or {}).items()
    }


def build_explorer_data(
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
    max_channels: int = analysis_.MAX_CHANNELS,
    title: str = "featurescope explorer",
    splits: tuple[str, str] | None = None,
    keep_self: bool = False,
    batch_size: int = 16,
    similarity: Mapping[str, Any] | None = None,
    units: UnitsSpec | Sequence[str] | Mapping[str, TopActivations] | None = None,
) -> ExplorerData:
    """The explorer's data for ``search`` queried by ``queries``: what every page draws.

    Images are named by their path below the gallery's root (else their file name) and by
    their class folder where there are classes. A query that is itself in the gallery (the same
    file) is left out of its own neighbours unless ``keep_self``. The predicted class and its
    Grad-CAM are given only for a trained head (weights that are not random, with known
    classes). Each batch of queries goes through the model once for its embedding, class
    scores and stage maps together.

    Args:
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
        units: the Units section: a :class:`~featurescope.pages.UnitsSpec`, node names (e.g.
            ``["conv1", "conv2"]``, ``k`` 9), or a precomputed
            :func:`~featurescope.units.top_activations` result whose image ids index the
            gallery's images in id order (:func:`~featurescope.pages.gallery_images`);
            ``None``: no Units section.

    Returns:
        The plain, JSON-able :class:`~featurescope.pages.ExplorerData`.

    Raises:
        FeaturescopeError: no queries, none readable, or ``projection`` is unknown.

    Example:
        >>> import json, tempfile, featurescope as fs
        >>> from featurescope.pages import build_explorer_data
        >>> root = fs.data.make_synthetic_dataset(tempfile.mkdtemp(), train_per_class=2,
        ...                                  val_per_class=0, test_per_class=1, size=32)
        >>> search = fs.ImageSearch.build(fs.create_model("alexnet_half"), root, progress=False)
        >>> test = fs.data.ImageFolder(root / "test")
        >>> data = build_explorer_data(search, test.paths, query_labels=test.targets, k=3)
        >>> data["weights"], data["queries"][0]["name"], len(data["queries"][0]["neighbours"])
        ('random', 'circle_0000.png', 3)
        >>> json.loads(json.dumps(data)) == data
        True
    """
    if projection not in PROJECTIONS:
        raise FeaturescopeError(
            f"projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}"
        )
    paths = [str(p) for p in queries]
    if not paths:
        raise FeaturescopeError("the explorer needs at least one query image")
    labels = [int(v) for v in query_labels] if query_labels is not None else [-1] * len(paths)
    if len(labels) != len(paths):
        raise FeaturescopeError(f"{len(labels)} query labels for {len(paths)} queries")
    batch, kept, unreadable = analysis_.load_queries(search, paths)
    if batch is None:
        raise FeaturescopeError(
            f"none of the {len(paths)} query images could be read (first: {paths[0]!r})"
        )
    paths, labels = [paths[i] for i in kept], [labels[i] for i in kept]
    meta = model_metadata(search.model)
    names = analysis_.head_classes(search.model)
    analysis = analysis_.analyse(
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
    pictures = [model_view(t, search.preprocessing) for t in batch]
    queries_data: list[Query] = [
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
    points = [int(point[0]) for point in projected["points"]]
    shown = query_hits + list(projected["neighbours"].values())
    data: ExplorerData = {
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
        "display_size": DISPLAY_SIZE,
        "runs": _runs(runs),
        "metrics": metric_rows(metrics),
        "notes": _notes(search, unreadable),
        "images": pictures,
        "queries": queries_data,
        "cam_node": analysis.cam_node,
        "cam_side": analysis_.CAM_SIDE,
        "no_cam_reason": _no_cam_reason(search, names),
        "gallery": _gallery(search, shown, points, own, pictures),
        "stages": analysis.stages,
        "projection": projected,
        "similarity": _similarity(similarity),
        "units": None,
    }
    if units is not None:
        data["units"] = _gallery_units(search, units, pictures, batch_size)
    return data


def _hits(distances: torch.Tensor, ids: torch.Tensor) -> list[list[list[Any]]]:
    return [
        [[int(i), round(float(d), 5)] for d, i in zip(drow, irow, strict=True) if int(i) >= 0]
        for drow, irow in zip(distances.tolist(), ids.tolist(), strict=True)
    ]


def _runs(runs: Mapping[str, Any] | None) -> list[Run]:
    out: list[Run] = []
    for name, history in (runs or {}).items():
        h = history.to_dict() if hasattr(history, "to_dict") else dict(history)
        out.append(
            {
                "name": name,
                "train_loss": list(h.get("train_loss", [])),
                "val_loss": list(h.get("val_loss", [])),
                "train_acc": list(h.get("train_acc", [])),
                "val_acc": list(h.get("val_acc", [])),
            }
        )
    return out


def _wording(search: ImageSearch, splits: tuple[str, str] | None) -> Wording:
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


def _similarity(similarity: Mapping[str, Any] | None) -> list[SimilarityTable]:
    """The comparisons the page draws as tables: plain names, nodes, values and estimators."""
    if not similarity:
        return []
    tables: list[SimilarityTable] = []
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


def _projection(search: ImageSearch, k: int, max_points: int, method: str) -> Projection:
    """The gallery in 2-D (at most ``max_points``, evenly spaced) and each point's neighbours."""
    all_ids = search.index.ids
    step = max(1, -(-len(all_ids) // max_points))
    rows = torch.arange(0, len(all_ids), step)
    used, xy = project_2d(search.index.vectors[rows], method)
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
) -> list[GalleryImage]:
    """The gallery images the page shows (neighbours and projected points), each picture
    shipped once: a query's own picture serves for its gallery entry; a missing file gets
    ``"image": None``."""
    used = {i for hits in shown for i, _ in hits} | set(points)
    already = {gid: position for position, gid in enumerate(own) if gid is not None}
    where, by_id = search.image_paths(), search.labels()
    gallery: list[GalleryImage] = []
    for i in sorted(used):
        path = where.get(i)
        picture: int | None = already.get(i)
        if picture is None and path:
            url = thumbnail(path)
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


class _Files(torch.utils.data.Dataset[torch.Tensor]):
    """Image files, read and preprocessed as the model reads them, on demand."""

    def __init__(self, paths: Sequence[str], transform: Any) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from featurescope.data.folders import load_rgb

        tensor: torch.Tensor = self.transform(load_rgb(self.paths[i]))
        return tensor


def gallery_images(search: ImageSearch) -> tuple[list[int], Dataset[torch.Tensor]]:
    """The gallery's images whose files are there, in id order: ``(their ids, a dataset of
    them preprocessed)``. The Units section's image ids index this dataset.

    Raises:
        FeaturescopeError: none of the gallery's files is there.
    """
    where = search.image_paths()
    ids = [i for i in sorted(where) if where[i] and os.path.isfile(where[i] or "")]
    if not ids:
        raise FeaturescopeError(
            "the Units section reads the gallery's images, and none is there: "
            f"{search.missing_summary() or 'the index records no paths'}"
        )
    return ids, _Files([where[i] or "" for i in ids], search.preprocessing.transform())


def _gallery_units(
    search: ImageSearch,
    units: UnitsSpec | Sequence[str] | Mapping[str, TopActivations],
    pictures: list[str],
    batch_size: int,
) -> Units:
    ids, data = gallery_images(search)
    where, labels = search.image_paths(), search.labels()
    return build_units(
        search.model,
        data,
        as_spec(units),
        pictures,
        preprocessing=search.preprocessing,
        names=lambda i: search.display_name(where[ids[i]] or f"#{ids[i]}"),
        labels=lambda i: labels[ids[i]],
        batch_size=batch_size,
    )
