"""The explorer: one offline HTML page to look at a model's training, feature maps and search.

:func:`write_explorer` writes a single file that works from ``file://`` with no server and no
network request: the data (thumbnails, feature maps as bytes, neighbours, a 2-D projection)
sits inline as JSON and a small vanilla script (``explorer.js``, shipped beside this module)
draws it. ``featurescope demo`` ends by writing one; ``featurescope explore`` writes one for any
saved :class:`~featurescope.ImageSearch`.

The page has a stable contract for tests: each query thumbnail carries
``data-fs-query="<query index>"``, each neighbour shown ``data-fs-neighbour="<gallery id>"``,
each channel choice ``data-fs-channel="<stage>:<channel>"``, each training run
``data-fs-run="<name>"`` and each projected point ``data-fs-point="<gallery id>"``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurescope._io import atomic_open
from featurescope._torch_utils import model_device, training_mode
from featurescope._version import __version__
from featurescope.errors import FeaturescopeError
from featurescope.index import retrieval_metrics
from featurescope.study._search import ImageSearch, _zoo_facts
from featurescope.tap import FeatureTap, last_spatial_node

__all__ = ["explore_index", "query_images", "write_explorer"]

PathLike = str | os.PathLike[str]

#: Side in pixels of the feature-map canvases and of each query's crop.
DISPLAY_SIZE = 160
_THUMB = 72
_METRIC_NAMES = {
    "precision_at_1": "precision@1",
    "precision_at_k": "precision@k",
    "recall_at_k": "recall@k",
    "r_precision": "R-precision",
    "mean_average_precision_at_r": "mAP@R",
}


def _data_url(picture: Any, fmt: str = "JPEG") -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail(path: str, side: int = _THUMB) -> str:
    from PIL import ImageOps

    from featurescope.data.folders import load_rgb

    return _data_url(ImageOps.fit(load_rgb(path), (side, side)))


def _crop(tensor: torch.Tensor, search: ImageSearch) -> str:
    """The preprocessed input as the model saw it, for overlays that line up with its maps."""
    from PIL import Image

    rgb = search.preprocessing.denormalize(tensor).permute(1, 2, 0).numpy()
    picture = Image.fromarray((rgb * 255).round().astype(np.uint8))
    return _data_url(picture.resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.Resampling.BILINEAR))


def _to_bytes(values: torch.Tensor) -> str:
    """Scale each leading slice of ``values`` to 0-255 on its own and base64 the uint8 bytes."""
    flat = values.reshape(values.shape[0], -1).double() if values.dim() > 2 else values.double()
    lo = flat.min(dim=-1, keepdim=True).values
    span = flat.max(dim=-1, keepdim=True).values - lo
    scaled = torch.where(span > 0, (flat - lo) / span.clamp(min=1e-300), torch.zeros_like(flat))
    raw = (scaled * 255).round().to(torch.uint8).numpy().tobytes()
    return base64.b64encode(raw).decode("ascii")


def _stage_maps(
    search: ImageSearch, batch: torch.Tensor, stages: Sequence[str]
) -> list[dict[str, Any]]:
    if not stages:
        return []
    model = search.model
    with training_mode(model, False), torch.inference_mode():
        out = FeatureTap(model, list(stages))(batch.to(model_device(model) or "cpu"))
    result = []
    for stage in stages:
        maps = out[stage].float().cpu()
        if maps.dim() != 4:
            continue  # class scores and other non-maps are not drawn
        entries = []
        for one in maps:
            means = one.mean(dim=(1, 2))
            order = sorted(range(len(means)), key=lambda c: (-float(means[c]), c))
            entries.append(
                {
                    "order": order,
                    "means": [round(float(m), 5) for m in means],
                    "data": _to_bytes(one),
                    "sum": _to_bytes(one.sum(dim=0)[None]),
                }
            )
        result.append({"name": stage, "shape": list(maps.shape[1:]), "maps": entries})
    return result


def _gradcams(search: ImageSearch, batch: torch.Tensor, class_names: Any) -> list[str]:
    from featurescope.visualizers import visualize

    node = last_spatial_node(search.model, tuple(batch.shape[1:]))
    urls = []
    for image in batch:
        figure = visualize(
            "gradcam",
            image,
            model=search.model,
            node=node,
            preprocessing=search.preprocessing,
            class_names=class_names,
            size=2.4,
        )
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=72)
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


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
    title: str = "featurescope explorer",
) -> Path:
    """Write the explorer page of ``search`` queried by ``queries`` to the file ``out``.

    Args:
        out: the HTML file to write (atomically).
        search: the model and the gallery index.
        queries: query image files (the study's test images).
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
        title: the page's title.

    Returns:
        The path written.

    Raises:
        FeaturescopeError: no queries, or ``projection`` is unknown.

    Example:
        >>> import pathlib, tempfile, featurescope as fs
        >>> from featurescope.study import write_explorer
        >>> root = fs.make_synthetic_dataset(tempfile.mkdtemp(), train_per_class=2,
        ...                                  val_per_class=0, test_per_class=1, size=32)
        >>> search = fs.ImageSearch.build(fs.create_model("alexnet_half"), root, progress=False)
        >>> test = fs.ImageFolder(root / "test")
        >>> page = write_explorer(root / "explorer.html", search, test.paths,
        ...                       query_labels=test.targets, k=3)
        >>> 'data-fs-query' in page.read_text()
        True
    """
    if projection not in ("auto", "pca", "umap"):
        raise FeaturescopeError(f"projection must be 'auto', 'pca' or 'umap', got {projection!r}")
    paths = [str(p) for p in queries]
    if not paths:
        raise FeaturescopeError("the explorer needs at least one query image")
    labels = [int(v) for v in query_labels] if query_labels is not None else [-1] * len(paths)
    if len(labels) != len(paths):
        raise FeaturescopeError(f"{len(labels)} query labels for {len(paths)} queries")
    k = min(k, len(search.index))
    batch = search.preprocess(paths)
    vectors = search.embed_images(batch)
    answer = search.index.search(vectors, k)
    facts = _zoo_facts(search.model)
    with training_mode(search.model, False), torch.inference_mode():
        scores = search.model(batch.to(model_device(search.model) or "cpu"))
    classifier = isinstance(scores, torch.Tensor) and scores.dim() == 2
    predicted = scores.argmax(dim=1).tolist() if classifier else [None] * len(paths)
    shown = batch[:max_map_images]
    maps = _stage_maps(search, shown, list(stages) if stages is not None else list(facts.stages))
    model_classes = facts.class_names or search.class_names
    cams = _gradcams(search, shown, model_classes) if classifier else []

    all_ids = search.index.ids
    step = max(1, -(-len(all_ids) // max_points))
    rows = torch.arange(0, len(all_ids), step)
    method, xy = _project(
        search.index.vectors[rows], "auto" if projection == "auto" else projection
    )
    point_ids = all_ids[rows]
    around = (
        search.index.search(
            search.index.vectors[rows],
            min(k, len(all_ids) - 1) or 1,
            exclude_ids=point_ids[:, None],
        )
        if len(all_ids) > 1
        else None
    )
    point_hits = _hits(around.distances, around.ids) if around is not None else [[] for _ in rows]

    if (
        metrics is None
        and all(label >= 0 for label in labels)
        and bool((search.index.labels >= 0).all())
    ):
        metrics = {"this model": retrieval_metrics(search.index, vectors, labels, k=k)}
    query_hits = _hits(answer.distances, answer.ids)
    used = {i for hits in query_hits + point_hits for i, _ in hits} | set(point_ids.tolist())
    where = search.image_paths()
    gallery_labels = search.labels()
    gallery = []
    for i in sorted(used):
        path = where.get(i)
        if path:
            gallery.append(
                {"id": i, "label": gallery_labels[i], "path": path, "thumb": _thumbnail(path)}
            )
    model_name = facts.name or type(search.model).__name__
    data = {
        "title": title,
        "version": __version__,
        "model": model_name,
        "node": search.node,
        "k": k,
        "classes": list(search.class_names or []),
        "display_size": DISPLAY_SIZE,
        "runs": _runs(runs),
        "metrics": {
            row: {_METRIC_NAMES.get(key, key): value for key, value in values.items()}
            for row, values in (metrics or {}).items()
        },
        "queries": [
            {
                "path": path,
                "label": label,
                "predicted": pred,
                "thumb": crop,
                "crop": crop,
                "neighbours": hits,
                "gradcam": cams[i] if i < len(cams) else None,
            }
            for i, (path, label, pred, hits, crop) in enumerate(
                zip(
                    paths,
                    labels,
                    predicted,
                    query_hits,
                    [_crop(t, search) for t in batch],
                    strict=True,
                )
            )
        ],
        "gallery": gallery,
        "stages": maps,
        "projection": {
            "method": method,
            "points": [
                [int(i), round(float(x), 5), round(float(y), 5)]
                for i, (x, y) in zip(point_ids.tolist(), xy.tolist(), strict=True)
            ],
            "neighbours": {
                str(int(i)): h for i, h in zip(point_ids.tolist(), point_hits, strict=True)
            },
        },
    }
    page = _page(data)
    target = Path(out)
    with atomic_open(target, encoding="utf-8") as fh:
        fh.write(page)
    return target


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
) -> Path:
    """Write the explorer page of a saved :class:`~featurescope.ImageSearch`.

    Args:
        index: a folder written by :meth:`ImageSearch.save <featurescope.ImageSearch.save>` or
            ``featurescope index build``.
        images: the query images: a folder (class subfolders named as the index's classes
            mark hits and score precision) or one file; default: ``queries`` of the indexed
            images themselves, evenly spaced.
        out: the HTML file to write.
        k: neighbours shown per query.
        queries: how many query images at most.

    Returns:
        The page's path.
    """
    search = ImageSearch.load(index)
    if images is not None:
        paths, labels = query_images(images, search.class_names, limit=queries)
    else:
        where, by_id = search.image_paths(), search.labels()
        ids = sorted(where)
        step = max(1, -(-len(ids) // queries))
        picked = [i for i in ids[::step] if where[i]]
        paths, labels = [where[i] or "" for i in picked], [by_id[i] for i in picked]
    return write_explorer(
        out,
        search,
        paths,
        query_labels=labels,
        k=k,
        title=f"featurescope explorer: {Path(index).name}",
    )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em;
       color: #222; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
.fs-row { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.fs-note { color: #666; font-size: .9em; margin: .3em 0; }
.fs-legend { display: flex; flex-wrap: wrap; gap: .4em; margin: .4em 0; }
.fs-run { border: 1px solid #ccc; background: #fff; border-radius: 4px; padding: .2em .5em;
          cursor: pointer; font: inherit; }
.fs-run.fs-off { opacity: .35; text-decoration: line-through; }
.fs-swatch { display: inline-block; width: .8em; height: .8em; margin-right: .35em;
             border-radius: 2px; vertical-align: middle; }
.fs-chart .fs-grid { stroke: #eee; } .fs-tick { font-size: 10px; fill: #555; }
.fs-title { font-size: 12px; font-weight: 600; } .fs-dot { cursor: default; }
#fs-channels { display: flex; flex-wrap: wrap; gap: 2px; max-height: 9.5em; overflow-y: auto;
               max-width: 560px; }
.fs-chan { font: 11px monospace; padding: 1px 3px; border: 1px solid #ccc; background: #fafafa;
           cursor: pointer; min-width: 2.4em; }
.fs-chan.fs-selected, .fs-query.fs-selected { outline: 3px solid #1f77b4; }
canvas { border: 1px solid #ddd; image-rendering: auto; }
figure { margin: 0; } figcaption { font-size: 11px; text-align: center; }
#fs-queries { display: flex; flex-wrap: wrap; gap: 4px; }
.fs-query { width: 64px; height: 64px; cursor: pointer; border: 1px solid #ccc; }
.fs-tiles { display: flex; flex-wrap: wrap; gap: 6px; }
.fs-tile img { width: 72px; height: 72px; display: block; border: 3px solid transparent; }
.fs-hit img { border-color: #2ca02c; } .fs-miss img { border-color: #d62728; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: .25em .6em;
text-align: right; } th:first-child, td:first-child { text-align: left; }
.fs-scatter circle { cursor: pointer; stroke: #fff; stroke-width: .8; }
.fs-scatter circle.fs-picked { stroke: #000; stroke-width: 2.5; }
"""


def _metrics_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    if not metrics:
        return "<p class='fs-note'>No labels on the queries: no precision to score.</p>"
    columns = list(dict.fromkeys(c for row in metrics.values() for c in row if c != "num_queries"))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{row.get(c, float('nan')):.3f}</td>" for c in columns)
        + "</tr>"
        for name, row in metrics.items()
    )
    return f"<table id='fs-metrics'><tr><th></th>{head}</tr>{body}</table>"


def _page(data: dict[str, Any]) -> str:
    script = resources.files("featurescope.study").joinpath("explorer.js").read_text("utf-8")
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    size = data["display_size"]
    canvases = "".join(
        f"<figure><canvas id='fs-map-{name}' width='{size}' height='{size}'></canvas>"
        f"<figcaption>{caption}</figcaption></figure>"
        for name, caption in (
            ("channel", "the channel"),
            ("sum", "summed over channels"),
            ("overlay", "the sum over the input"),
        )
    )
    curves = (
        "<h2>Training: width × batch size</h2><div id='fs-curves'></div>" if data["runs"] else ""
    )
    maps = (
        "<h2>Feature maps</h2><div id='fs-maps'><p>Test image <select id='fs-map-image'>"
        "</select> stage <select id='fs-stage'></select></p><p class='fs-note'>Channels, "
        "strongest mean activation first:</p><div id='fs-channels'></div>"
        f"<div class='fs-row'>{canvases}</div><p id='fs-map-caption' class='fs-note'></p></div>"
        if data["stages"]
        else ""
    )
    k = data["k"]
    method = data["projection"]["method"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{html.escape(data["title"])}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(data["title"])}</h1>
<p class="fs-note">{html.escape(data["model"])}, embedding node {html.escape(data["node"])};
{len(data["queries"])} queries, {len(data["gallery"])} gallery images shown. featurescope
{html.escape(data["version"])}. Works offline: everything is in this file.</p>
{curves}
<h2>Search by image</h2>
<p class="fs-note">Click a test image: its {k} nearest training images, nearest first, framed
green where the class matches (a hit) and red where not.</p>
<div id="fs-queries"></div>
<div class="fs-row"><div style="flex: 1 1 560px"><p id="fs-query-caption"></p>
<div id="fs-search-results" class="fs-tiles"></div></div>
<div><h3>Retrieval scores</h3>{_metrics_table(data["metrics"])}
<h3>Grad-CAM of the predicted class</h3><img id="fs-gradcam" alt="Grad-CAM"></div></div>
{maps}
<h2>Gallery embeddings in 2-D ({html.escape(method)})</h2>
<p class="fs-note">Coloured by class; click a point for its image and its nearest neighbours.</p>
<div class="fs-row"><div id="fs-projection"></div><div><img id="fs-point-image" alt=""
style="display:none;width:120px"><p id="fs-point-caption" class="fs-note"></p>
<div id="fs-point-neighbours" class="fs-tiles"></div></div></div>
<script id="fs-data" type="application/json">{payload}</script>
<script>{script}</script>
</body></html>
"""
