"""The demo's one-page HTML report: every figure and number of ``featurescope demo``.

The page is static and self-contained apart from the figures beside it, which it links by
relative path; it links only files that exist. It is drawn from :mod:`featurescope.pages`'
templates (``report.html`` and one template per section under ``report/``) with the
explorer's stylesheet; this module only gathers each section's values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from featurescope._io import atomic_open
from featurescope._version import __version__
from featurescope.pages import weights_sentence

__all__ = ["write_report"]

Section = dict[str, Any]


class _Figures:
    """Figures in the report's folder: linked when the file is there, else named as missing."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, name: str | None, caption: str) -> dict[str, str | None]:
        present = bool(name) and (self.folder / str(name)).is_file()
        return {"src": name if present else None, "caption": caption}


def _width_section(
    figure: _Figures, width: Mapping[str, Any], preset: Mapping[str, Any]
) -> Section:
    changes = []
    if preset["optimizer"] != "sgd" or preset.get("init"):
        changes = [f"{preset['optimizer']} instead of SGD"]
        if preset.get("init"):
            changes.insert(0, f"{preset['init']} (He) initialisation")
    table = width.get("table")
    return {
        "template": "width.html",
        "optimizer": preset["optimizer"],
        "schedule": ", ".join(f"epoch ≥ {e}: {lr:g}" for e, lr in preset["lr_schedule"].items()),
        "epochs": preset["epochs"],
        "batch_sizes": preset["batch_sizes"],
        "changes": changes,
        "figure": figure(width.get("figure"), "training and validation loss and accuracy"),
        "runs": list(width["runs"]),
        "columns": [
            ("run", "run"),
            ("epochs", "epochs"),
            ("final_train_acc", "final train acc"),
            ("final_val_acc", "final val acc"),
            ("best_val_acc", "best val acc"),
        ],
        "verdict": _width_verdict(width["runs"]),
        "table": table if table and (figure.folder / table).is_file() else None,
    }


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
    return f"Best validation accuracy: full width {full:.3f}, half width {half:.3f}; {verdict}."


def _preprocessing_text(pre: Mapping[str, Any] | None) -> str:
    if not pre:
        return "unknown preprocessing"
    mean = ", ".join(f"{v:g}" for v in pre["mean"])
    std = ", ".join(f"{v:g}" for v in pre["std"])
    return (
        f"Resize {pre['resize']} ({pre.get('interpolation', 'bilinear')}), CenterCrop "
        f"{pre['crop']}, normalised with mean ({mean}) and std ({std})"
    )


def _maps_section(figure: _Figures, maps: Mapping[str, Any]) -> Section:
    stage = str(maps.get("overlay_stage", ""))
    probs = maps.get("class_probabilities") or {}
    return {
        "template": "maps.html",
        "model": maps["model"],
        "image": Path(maps["image"]).name,
        "label": maps["label"],
        "preprocessing": _preprocessing_text(maps.get("preprocessing")),
        "shapes": ", ".join(f"{s} {shape}" for s, shape in maps["shapes"].items()),
        "probabilities": [{"class": c, "p": p} for c, p in probs.items()],
        "overlay": figure(maps.get("overlay"), f"{stage} summed over channels, over the input"),
        "stages": [
            {
                "name": name,
                "shape": maps["shapes"].get(name),
                "sum": figure(files.get("sum"), f"{name}: summed over channels"),
                "grid": figure(files.get("grid"), f"{name}: every channel"),
            }
            for name, files in maps["figures"].items()
        ],
    }


def _units_section(figure: _Figures, units: Mapping[str, Any]) -> Section:
    """What the trained net's channels respond to (Zeiler & Fergus), when measured."""
    return {
        "template": "units.html",
        "k": units["k"],
        "num_images": units["num_images"],
        "shown_channels": units["shown_channels"],
        "projection": str(units["projection"]),
        "units": units["units"],
        "figures": [
            figure(file, f"{stage}: each channel's top patches and projections")
            for stage, file in units["figures"].items()
        ],
    }


def _retrieval_section(figure: _Figures, retrieval: Mapping[str, Any]) -> Section:
    k = retrieval["k"]
    trained, base = retrieval["trained"], retrieval["random_weights"]
    rows = [
        {"metric": name, "trained": trained.get(key), "random": base.get(key)}
        for key, name in (
            ("precision_at_1", "precision@1"),
            ("precision_at_k", f"precision@{k}"),
            ("recall_at_k", f"recall@{k}"),
            ("mean_average_precision_at_r", "mAP@R"),
        )
    ]
    chance = retrieval.get("chance_precision")
    rows.append({"metric": "chance (largest class share)", "trained": chance, "random": chance})
    model = str(retrieval.get("model", "net"))
    return {
        "template": "retrieval.html",
        "k": k,
        "embedding_dim": retrieval.get("embedding_dim", "?"),
        "node": str(retrieval.get("embedding_node")),
        "model": str(retrieval.get("model")),
        "num_queries": retrieval["num_queries"],
        "gallery_size": retrieval["gallery_size"],
        "weights_sentence": weights_sentence(retrieval.get("weights")),
        "rows": rows,
        "columns": [
            ("metric", "metric"),
            ("trained", f"trained {model}"),
            ("random", "random weights"),
        ],
        "figure": figure(
            retrieval.get("figure"),
            f"each query (left) and its {k} nearest training images; green: same class",
        ),
    }


def _similarity_section(figure: _Figures, similarity: Mapping[str, Any]) -> Section:
    """The two widths' representations compared stage by stage (linear CKA)."""
    from markupsafe import Markup

    from featurescope.compare import Comparison, comparison_table

    comparisons = []
    for entry in similarity["comparisons"]:
        result = Comparison.from_dict(
            {
                **entry,
                "nodes_a": similarity["stages"],
                "nodes_b": similarity["stages"],
                "num_images": similarity["num_images"],
            }
        )
        # comparison_table escapes what it writes: its HTML goes in as it is.
        comparisons.append(
            {
                "figure": figure(entry["figure"], entry["name"]),
                "table": Markup(comparison_table(result)),
            }
        )
    return {
        "template": "similarity.html",
        "runs": ", ".join(similarity["runs"]),
        "num_images": similarity["num_images"],
        "num_batches": similarity["num_batches"],
        "batch_size": similarity["batch_size"],
        "comparisons": comparisons,
    }


def write_report(folder: str | os.PathLike[str], metrics: Mapping[str, Any]) -> Path:
    """Write ``report.html`` into ``folder`` from what :func:`featurescope.study.demo.run_demo` measured.

    Args:
        folder: the demo's output folder, holding the figures named in ``metrics``.
        metrics: the contents of ``metrics.json``.

    Returns:
        The report's path.
    """
    from featurescope.pages import render

    figure = _Figures(Path(folder))
    preset, data = metrics["preset"], metrics["data"]
    sections = [
        _width_section(figure, metrics["width_comparison"], preset),
        _maps_section(figure, metrics["feature_maps"]),
    ]
    if metrics.get("similarity"):
        sections.append(_similarity_section(figure, metrics["similarity"]))
    if metrics.get("units"):
        sections.append(_units_section(figure, metrics["units"]))
    sections.append(_retrieval_section(figure, metrics["retrieval"]))
    page = render(
        "report.html",
        title="featurescope demo report",
        version=__version__,
        sections=sections,
        report={
            "preset": preset,
            "data": data,
            "sizes": ", ".join(f"{n} {split}" for split, n in data["sizes"].items()),
            "total_seconds": metrics.get("seconds", {}).get("total", 0),
            "explorer": metrics.get("explorer"),
        },
    )
    path = Path(folder) / "report.html"
    with atomic_open(path, encoding="utf-8") as fh:
        fh.write(page)
    return path
