"""The demo's one-page HTML report: every figure and number of ``featurescope demo``.

The page is static and self-contained apart from the figures beside it, which it links by
relative path; it links only files that exist.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from featurescope._io import atomic_open
from featurescope._version import __version__
from featurescope.study._search import weights_sentence

__all__ = ["write_report"]

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { background: #f6f8fa; border-left: 4px solid #888; padding: 0.5em 1em; }
.pair { display: flex; gap: 1em; flex-wrap: wrap; align-items: flex-start; }
.pair figure { margin: 0; flex: 1 1 300px; }
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _table(rows: Sequence[Mapping[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(row.get(key))}</td>" for key, _ in columns) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


class _Page:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.parts: list[str] = []

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)

    def figure(self, name: str | None, caption: str) -> str:
        """An ``<img>`` of a file in the report's folder, or a note if it is missing."""
        if not name or not (self.folder / name).is_file():
            return f"<p class='note'>Figure not produced: {html.escape(caption)}</p>"
        src = html.escape(name, quote=True)
        return (
            f"<figure><a href='{src}'><img src='{src}' alt='{html.escape(caption, quote=True)}'>"
            f"</a><figcaption>{html.escape(caption)}</figcaption></figure>"
        )


def _width_section(page: _Page, width: Mapping[str, Any], preset: Mapping[str, Any]) -> None:
    page.add("<h2>1. Width: full AlexNet against its single-GPU half</h2>")
    schedule = ", ".join(f"epoch ≥ {e}: {lr:g}" for e, lr in preset["lr_schedule"].items())
    page.add(
        f"<p>Both widths trained with {html.escape(preset['optimizer'])} ({schedule}), "
        f"{preset['epochs']} epochs, batch sizes {preset['batch_sizes']}.</p>"
    )
    if preset["optimizer"] != "sgd" or preset.get("init"):
        changes = [f"{html.escape(preset['optimizer'])} instead of SGD"]
        if preset.get("init"):
            changes.insert(0, f"{html.escape(preset['init'])} (He) initialisation")
        page.add(
            f"<p class='note'>This preset departs from the study: {' and '.join(changes)}. Under "
            "the study's SGD at lr 0.01 with PyTorch's default initialisation, an AlexNet "
            "without normalisation sits at chance for many epochs, far longer than a few CPU "
            "minutes. <code>featurescope demo --preset study</code> runs the study's own "
            "schedule (SGD with momentum, lr 0.01 then 0.003 from epoch 19, 150 epochs, batch "
            "sizes 8 and 16), best on a GPU.</p>"
        )
    page.add(page.figure(width.get("figure"), "training and validation loss and accuracy"))
    page.add(
        _table(
            list(width["runs"]),
            [
                ("run", "run"),
                ("epochs", "epochs"),
                ("final_train_acc", "final train acc"),
                ("final_val_acc", "final val acc"),
                ("best_val_acc", "best val acc"),
            ],
        )
    )
    page.add(_width_verdict(width["runs"]))
    table = width.get("table")
    if table and (page.folder / table).is_file():
        page.add(
            f"<p>As CSV: <a href='{html.escape(table, quote=True)}'>{html.escape(table)}</a></p>"
        )


def _width_verdict(runs: Sequence[Mapping[str, Any]]) -> str:
    """One sentence comparing the widths' best validation accuracy with the study's finding."""
    best: dict[str, float] = {}
    params: dict[str, int] = {}
    for run in runs:
        if run.get("best_val_acc") is not None:
            best[run["model"]] = max(best.get(run["model"], 0.0), run["best_val_acc"])
            params[run["model"]] = int(run.get("parameters") or 0)
    if len(best) != 2:
        return ""  # the verdict compares two widths
    narrow, wide = sorted(best, key=params.__getitem__)
    full, half = best[wide], best[narrow]
    if half < full:
        verdict = "the halved net did worse, as the study found"
    elif half > full:
        verdict = (
            "here the halved net did better, unlike in the study, which trained for 150 "
            "epochs: in a few epochs the smaller net can learn faster"
        )
    else:
        verdict = "the two widths tied"
    return (
        f"<p>Best validation accuracy: full width {full:.3f}, half width {half:.3f}; "
        f"{html.escape(verdict)}.</p>"
    )


def _preprocessing_text(pre: Mapping[str, Any] | None) -> str:
    if not pre:
        return "unknown preprocessing"
    mean = ", ".join(f"{v:g}" for v in pre["mean"])
    std = ", ".join(f"{v:g}" for v in pre["std"])
    return (
        f"Resize {pre['resize']} ({pre.get('interpolation', 'bilinear')}), CenterCrop "
        f"{pre['crop']}, normalised with mean ({mean}) and std ({std})"
    )


def _maps_section(page: _Page, maps: Mapping[str, Any]) -> None:
    page.add("<h2>2. Feature maps, stage by stage</h2>")
    shapes = ", ".join(f"{html.escape(s)} {shape}" for s, shape in maps["shapes"].items())
    page.add(
        f"<p>Model: {html.escape(maps['model'])} (best validation accuracy). Test image "
        f"<code>{html.escape(Path(maps['image']).name)}</code> of class "
        f"<b>{html.escape(maps['label'])}</b>, preprocessed as the model expects "
        f"({_preprocessing_text(maps.get('preprocessing'))}). Output shapes: {shapes}.</p>"
    )
    probs = maps.get("class_probabilities") or {}
    if probs:
        page.add(
            _table(
                [{"class": c, "p": p} for c, p in probs.items()],
                [("class", "class"), ("p", "predicted probability")],
            )
        )
    stage = html.escape(str(maps.get("overlay_stage", "")))
    page.add(page.figure(maps.get("overlay"), f"{stage} summed over channels, over the input"))
    for stage, files in maps["figures"].items():
        shape = maps["shapes"].get(stage)
        page.add(f"<h3>{html.escape(stage)} {shape}</h3><div class='pair'>")
        page.add(page.figure(files.get("sum"), f"{stage}: summed over channels"))
        page.add("</div>")
        page.add(page.figure(files.get("grid"), f"{stage}: every channel"))


def _units_section(page: _Page, units: Mapping[str, Any] | None) -> None:
    """What the trained net's channels respond to (Zeiler & Fergus), when measured."""
    if not units:
        return
    page.add("<h2>What do the channels respond to?</h2>")
    page.add(
        f"<p>The feature maps above stop being legible from conv2 on. Zeiler &amp; Fergus "
        f"(2014) looked instead, for each channel, at the {units['k']} images of the dataset "
        f"that excite it most, and projected each of those activations back to pixels with a "
        f"deconvnet. Here: over the {units['num_images']} training images, each channel's "
        f"strongest position per image; every figure shows the {units['shown_channels']} "
        "channels with the strongest top activation, one row each: the patch of the image "
        "that the activation reads (its exact receptive field), then its "
        f"{html.escape(str(units['projection']))} projection (grey is zero). Every channel's "
        "top images, values and receptive-field boxes are in "
        f"<a href='{html.escape(units['units'], quote=True)}'>{html.escape(units['units'])}</a>."
        "</p>"
    )
    for stage, figure in units["figures"].items():
        page.add(page.figure(figure, f"{stage}: each channel's top patches and projections"))


def _retrieval_section(page: _Page, retrieval: Mapping[str, Any]) -> None:
    k = retrieval["k"]
    page.add("<h2>3. Search by image</h2>")
    page.add(
        f"<p>The AlexNet paper's claim: images whose last-hidden-layer vectors "
        f"({retrieval.get('embedding_dim', '?')}-d, the output of node "
        f"<code>{html.escape(str(retrieval.get('embedding_node')))}</code> of "
        f"{html.escape(str(retrieval.get('model')))}) are close in Euclidean distance look alike. "
        f"Each of {retrieval['num_queries']} test images searched the "
        f"{retrieval['gallery_size']} training images for its {k} nearest, exactly.</p>"
    )
    page.add(
        f"<p class='note' id='weights'>{html.escape(weights_sentence(retrieval.get('weights')))} "
        "The last column is the same network with random weights, before training.</p>"
    )
    trained, base = retrieval["trained"], retrieval["random_weights"]
    model = html.escape(str(retrieval.get("model", "net")))
    rows = [
        {"metric": name, "trained": trained.get(key), "random": base.get(key)}
        for key, name in (
            ("precision_at_1", "precision@1"),
            ("precision_at_k", f"precision@{k}"),
            ("recall_at_k", f"recall@{k}"),
            ("mean_average_precision_at_r", "mAP@R"),
        )
    ]
    rows.append(
        {
            "metric": "chance (largest class share)",
            "trained": retrieval.get("chance_precision"),
            "random": retrieval.get("chance_precision"),
        }
    )
    page.add(
        _table(
            rows,
            [("metric", "metric"), ("trained", f"trained {model}"), ("random", "random weights")],
        )
    )
    page.add(
        page.figure(
            retrieval.get("figure"),
            f"each query (left) and its {k} nearest training images; green: same class",
        )
    )


def _similarity_section(page: _Page, similarity: Mapping[str, Any] | None) -> None:
    """The two widths' representations compared stage by stage (linear CKA), when measured."""
    if not similarity:
        return
    from featurescope.compare import Comparison, comparison_table

    page.add("<h2>Do the two widths learn the same representations?</h2>")
    page.add(
        f"<p>Linear CKA (Kornblith et al. 2019) between the stages of the best runs "
        f"({html.escape(', '.join(similarity['runs']))}), over {similarity['num_images']} "
        f"held-out images, each stage's output flattened, unbiased minibatch estimator "
        f"(Nguyen et al. 2021) over {similarity['num_batches']} batches of "
        f"{similarity['batch_size']}. 1 on a diagonal means the same representation up to "
        "rotation and scale; each model against itself shows how much consecutive stages "
        "share.</p>"
    )
    for entry in similarity["comparisons"]:
        page.add(page.figure(entry["figure"], entry["name"]))
        result = Comparison.from_dict(
            {
                **entry,
                "nodes_a": similarity["stages"],
                "nodes_b": similarity["stages"],
                "num_images": similarity["num_images"],
            }
        )
        page.add(comparison_table(result))


def write_report(folder: str | os.PathLike[str], metrics: Mapping[str, Any]) -> Path:
    """Write ``report.html`` into ``folder`` from what :func:`featurescope.study.demo.run_demo` measured.

    Args:
        folder: the demo's output folder, holding the figures named in ``metrics``.
        metrics: the contents of ``metrics.json``.

    Returns:
        The report's path.
    """
    page = _Page(Path(folder))
    preset, data = metrics["preset"], metrics["data"]
    seconds = metrics.get("seconds", {})
    page.add(
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>featurescope demo report</title>"
        f"<style>{_STYLE}</style></head><body>"
    )
    page.add("<h1>featurescope: the AlexNet study, reproduced</h1>")
    sizes = ", ".join(f"{n} {split}" for split, n in data["sizes"].items())
    page.add(
        f"<p>Preset <b>{html.escape(preset['name'])}</b>: {html.escape(preset['description'])}. "
        f"Data: <code>{html.escape(data['root'])}</code>, {len(data['classes'])} classes "
        f"({html.escape(', '.join(data['classes']))}), {sizes} images. "
        f"Total time {seconds.get('total', 0):.0f} s. featurescope {__version__}.</p>"
    )
    if metrics.get("explorer"):
        page.add(
            f"<p class='note'>Look and click instead: <a href='{html.escape(metrics['explorer'])}'>"
            "the explorer</a> (curves, feature maps by channel, search by image, a 2-D map of "
            "the embeddings and Grad-CAM, offline in one page).</p>"
        )
    _width_section(page, metrics["width_comparison"], preset)
    _maps_section(page, metrics["feature_maps"])
    _similarity_section(page, metrics.get("similarity"))
    _units_section(page, metrics.get("units"))
    _retrieval_section(page, metrics["retrieval"])
    page.add("<p>All numbers: <a href='metrics.json'>metrics.json</a>.</p></body></html>")
    path = Path(folder) / "report.html"
    with atomic_open(path, encoding="utf-8") as fh:
        fh.write("\n".join(page.parts))
    return path
