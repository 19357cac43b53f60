"""``featurescope demo``: the study's experiments end to end, and a report of them.

:func:`run_demo` draws (or opens) a dataset, trains both AlexNet widths, draws the trained
net's feature maps stage by stage, shows what its channels respond to (each channel's top
training images, patches and deconvnet projections), searches training images by the last
hidden layer, and writes every figure, ``metrics.json``, ``report.html`` and the interactive
``explorer.html`` (see :mod:`featurescope.study.explorer`) into one folder, then prints a
summary table.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from featurescope._io import atomic_open
from featurescope.data import ImageFolder
from featurescope.data.folders import DatasetSplits
from featurescope.errors import FeaturescopeError
from featurescope.index import retrieval_metrics
from featurescope.study import _experiments as study
from featurescope.train import BEST, LAST
from featurescope.train.presets import Preset, get_preset
from featurescope.visualizers import save as save_figure
from featurescope.visualizers import visualize
from featurescope.zoo import model_metadata as fs_model_metadata
from featurescope.zoo import resolve_preprocessing

__all__ = ["run_demo", "summary_table"]

PathLike = str | os.PathLike[str]
#: How many neighbours the retrieval experiment shows and scores, as in the study.
K = 10


def _log(progress: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if progress:
            print(f"[featurescope demo] {message}", flush=True)

    return log


def _gallery(splits: DatasetSplits) -> ImageFolder:
    """The training images without augmentation: what search by image looks through."""
    train = splits.train
    if splits.val is not None and splits.val.transform is not train.transform:
        gallery = train.subset(range(len(train)))
        gallery.transform = splits.val.transform
        return gallery
    return train


def _width_experiment(
    splits: DatasetSplits, preset: Preset, out: Path, device: Any, seed: int, progress: bool
) -> tuple[list[study.WidthRun], dict[str, Any]]:
    runs = study.compare_widths(
        splits, preset, out=out / "checkpoints", device=device, seed=seed, progress=progress
    )
    figure = visualize(
        "curves",
        {run.name: run.history.to_dict() for run in runs},
        title=f"Width comparison ({preset.name} preset)",
    )
    save_figure(figure, out / "width_curves.png")
    params = _parameters(preset, runs)
    table = [
        {
            "run": run.name,
            "model": run.model,
            "parameters": params[run.model],
            "batch_size": run.batch_size,
            "epochs": run.history.epochs,
            "final_train_acc": run.history.train_acc[-1],
            "final_val_acc": run.history.val_acc[-1] if run.history.val_acc else None,
            "best_val_acc": run.history.best_val_acc,
            "seconds": round(sum(run.history.seconds), 1),
        }
        for run in runs
    ]
    with atomic_open(out / "accuracy.csv") as fh:
        fh.write(",".join(table[0]) + "\n")
        for row in table:
            fh.write(",".join("" if v is None else str(v) for v in row.values()) + "\n")
    return runs, {
        "runs": table,
        "parameters": params,
        "figure": "width_curves.png",
        "table": "accuracy.csv",
    }


def _parameters(preset: Preset, runs: list[study.WidthRun]) -> dict[str, int]:
    """Each compared model's parameter count, as the preset builds it."""
    counts = {}
    for name in dict.fromkeys(run.model for run in runs):
        model = preset.build_model(name, seed=0)
        counts[name] = sum(p.numel() for p in model.parameters())
    return counts


def _best_full_width(runs: list[study.WidthRun], params: dict[str, int]) -> study.WidthRun:
    """The best run of the widest model compared (the one with the most parameters)."""
    widest = max(params, key=params.__getitem__)
    full = [run for run in runs if run.model == widest] or runs
    return max(full, key=lambda run: run.history.best_val_acc or 0.0)


def _similarity_experiment(
    runs: list[study.WidthRun],
    params: dict[str, int],
    splits: DatasetSplits,
    out: Path,
    device: Any,
    progress: bool,
) -> dict[str, Any] | None:
    """Linear CKA between the stages of the best widest and best narrowest runs."""
    from torch.utils.data import ConcatDataset

    widest, narrowest = max(params, key=params.__getitem__), min(params, key=params.__getitem__)
    best = {
        name: max(
            (run for run in runs if run.model == name),
            key=lambda run: run.history.best_val_acc or 0.0,
        )
        for name in (widest, narrowest)
    }
    full, half = best[widest].load_best(), best[narrowest].load_best()
    meta_full, meta_half = fs_model_metadata(full), fs_model_metadata(half)
    stages = meta_full.stage_nodes if meta_full is not None else ()
    if widest == narrowest or not stages or meta_half is None or meta_half.stage_nodes != stages:
        return None  # one width, or two models without the same named stages
    held_out = [split for split in (splits.val, splits.test) if split is not None]
    images = ConcatDataset(held_out) if held_out else splits.train
    result = study.compare_width_representations(
        full, half, images, out / "similarity", stages=stages, device=device, progress=progress
    )
    return {**result, "runs": [best[widest].name, best[narrowest].name]}


def _maps_experiment(model: torch.nn.Module, splits: DatasetSplits, out: Path) -> dict[str, Any]:
    dataset = splits.test or splits.eval or splits.train
    image, label = dataset[0]
    path = dataset.samples[0][0]
    maps = study.stage_maps(model, image)
    drawn = study.draw_stage_maps(maps, out / "maps")
    figures = {
        stage: {kind: str(path.relative_to(out)) for kind, path in files.items()}
        for stage, files in drawn.items()
    }
    original = resolve_preprocessing(model)
    first = next(iter(maps))  # the earliest stage: the most detailed map
    save_figure(
        visualize(
            "overlay",
            maps[first],
            image=original.denormalize(image),
            title=f"{first}, summed, over the input",
        ),
        out / "maps" / "overlay.png",
    )
    scores = torch.softmax(maps["fc"], dim=0).tolist() if "fc" in maps else []
    return {
        "image": path,
        "label": splits.classes[label],
        "shapes": {stage: list(t.shape) for stage, t in maps.items()},
        "figures": figures,
        "overlay": "maps/overlay.png",
        "overlay_stage": first,
        "preprocessing": original.to_dict(),
        "class_probabilities": dict(zip(splits.classes, scores, strict=False)),
    }


def _units_experiment(
    model: torch.nn.Module, splits: DatasetSplits, out: Path, device: Any, progress: bool
) -> dict[str, Any]:
    """What the trained net's channels at conv1, conv2, conv3 respond to, over the training
    images as search sees them (no augmentation)."""
    return study.channel_units(
        model, _gallery(splits), out / "units", device=device, progress=progress
    )


def _retrieval_experiment(
    model: torch.nn.Module,
    splits: DatasetSplits,
    preset: Preset,
    out: Path,
    device: Any,
    seed: int,
    progress: bool,
) -> tuple[dict[str, Any], Any, Any]:
    gallery = _gallery(splits)
    queries = splits.test or splits.eval
    if queries is None:
        raise FeaturescopeError("search by image needs test or validation images as queries")
    k = min(K, len(gallery))
    train_emb = study.embed(model, gallery, device=device, progress=progress)
    query_emb = study.embed(model, queries, device=device, progress=progress)
    index = study.index_embeddings(train_emb)
    scores = retrieval_metrics(index, query_emb["embedding"], query_emb.labels, k=k)

    # The same network before training: what the trained embedding is worth over its init.
    architecture = fs_model_metadata(model)
    name = architecture.architecture if architecture is not None else preset.models[0]
    untrained = preset.build_model(name, seed=seed, class_names=splits.classes)
    base_index = study.index_embeddings(
        study.embed(untrained, gallery, device=device, progress=progress)
    )
    base_queries = study.embed(untrained, queries, device=device, progress=progress)
    baseline = retrieval_metrics(base_index, base_queries["embedding"], base_queries.labels, k=k)

    rows = study.first_query_per_class(query_emb.labels)
    result = index.search(query_emb["embedding"][rows], k)
    labels = dict(zip(index.ids.tolist(), index.labels.tolist(), strict=True))
    figure = visualize(
        "montage",
        result,
        images={i: p for i, p in zip(index.ids.tolist(), index.metadata, strict=True)},
        queries=[query_emb.paths[r] for r in rows],
        labels=labels,
        query_labels=[int(query_emb.labels[r]) for r in rows],
        class_names=splits.classes,
        title=f"Search by image: each query, then its {k} nearest training images",
    )
    save_figure(figure, out / "retrieval_montage.png")
    chance = float(torch.bincount(index.labels).max()) / len(index)
    summary = {
        "k": k,
        "gallery_size": len(index),
        "num_queries": len(queries),
        "trained": scores,
        "random_weights": baseline,
        "chance_precision": chance,
        "model": name,
        "weights": architecture.weights if architecture is not None else None,
        "embedding_node": train_emb.nodes.get("embedding"),
        "embedding_dim": index.dim,
        "figure": "retrieval_montage.png",
    }
    return summary, index, query_emb


def run_demo(
    out: PathLike = "featurescope-demo",
    *,
    data: PathLike | None = None,
    preset: str | Preset = "quick",
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Reproduce the study's experiments and write a report of them to ``out``.

    Args:
        out: the output folder: ``report.html``, ``metrics.json``, ``accuracy.csv``, the
            figures, and ``checkpoints/``: while training, each run's resume state (an
            interrupted demo resumes from there); once the report is written, only the best
            weights of the runs it shows, and every run's history (a rerun reuses a run whose
            final weights are kept, and trains the others again). The last line printed says
            how much was written.
        data: an image folder with ``train/`` (and ``val/``, ``test/``) of class subfolders;
            default: the bundled synthetic dataset of the preset.
        preset: ``"quick"`` (minutes on a CPU) or ``"study"`` (the study's 150-epoch schedule,
            for a GPU), or a :class:`~featurescope.train.presets.Preset`.
        device: where to train and embed; default CUDA when available.
        seed: seeds the weights, the training and the baseline.
        progress: print each step and show progress bars.

    Returns:
        What ``metrics.json`` holds.
    """
    from featurescope.study.report import write_report

    log = _log(progress)
    preset = get_preset(preset) if isinstance(preset, str) else preset
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    log("1/6 data")
    splits = study.open_study_data(data, preset)
    log(
        f"    {len(splits.train)} training images of {len(splits.classes)} classes at {splits.root}"
    )

    log(
        f"2/6 width comparison: {', '.join(preset.models)} at batch sizes "
        f"{', '.join(map(str, preset.batch_sizes))}, {preset.epochs} epochs"
    )
    t = time.perf_counter()
    runs, width = _width_experiment(splits, preset, out, device, seed, progress)
    timings["width_comparison"] = time.perf_counter() - t
    best = _best_full_width(runs, width["parameters"])
    model = best.load_best()
    log(f"    best full-width run: {best.name}, val acc {best.history.best_val_acc}")

    log("3/6 feature maps per stage")
    t = time.perf_counter()
    maps = _maps_experiment(model, splits, out)
    timings["feature_maps"] = time.perf_counter() - t
    log("    layer by layer, do the two widths represent images alike? (linear CKA)")
    t = time.perf_counter()
    similarity = _similarity_experiment(runs, width["parameters"], splits, out, device, progress)
    timings["similarity"] = time.perf_counter() - t

    log("4/6 what the channels respond to: top-9 patches and deconvnet projections")
    t = time.perf_counter()
    units = _units_experiment(model, splits, out, device, progress)
    timings["units"] = time.perf_counter() - t

    log("5/6 search by image")
    t = time.perf_counter()
    retrieval, index, queries = _retrieval_experiment(
        model, splits, preset, out, device, seed, progress
    )
    timings["retrieval"] = time.perf_counter() - t

    log("6/6 the explorer page")
    t = time.perf_counter()
    explorer = _explorer(model, splits, index, queries, runs, retrieval, out, similarity)
    timings["explorer"] = time.perf_counter() - t
    reported = {best.name, *(similarity["runs"] if similarity else ())}
    _keep_reported_weights(runs, reported)
    timings["total"] = time.perf_counter() - started

    metrics: dict[str, Any] = {
        "preset": preset.to_dict(),
        "data": {
            "root": str(splits.root),
            "classes": list(splits.classes),
            "sizes": {
                name: len(split)
                for name, split in (
                    ("train", splits.train),
                    ("val", splits.val),
                    ("test", splits.test),
                )
                if split is not None
            },
        },
        "width_comparison": width,
        "feature_maps": {**maps, "model": best.name},
        "similarity": similarity,
        "units": units,
        "retrieval": retrieval,
        "explorer": explorer.name,
        "seconds": {name: round(value, 1) for name, value in timings.items()},
    }
    with atomic_open(out / "metrics.json") as fh:
        json.dump(metrics, fh, indent=2)
    report = write_report(out, metrics)
    if progress:
        print(summary_table(metrics), flush=True)
    log(f"done in {timings['total']:.0f} s: open {explorer} (or the static {report.name})")
    log(_disk_summary(out, sorted(reported)))
    return metrics


def _keep_reported_weights(runs: list[study.WidthRun], reported: set[str]) -> None:
    """Delete every checkpoint but the best model of each run the report shows.

    A full AlexNet's weights are 107 MB; the runs the report does not show, and the last
    epoch's weights where they are not the best, are not worth keeping. Each run keeps its
    history; a rerun trains again a run whose final weights are gone.
    """
    for run in runs:
        if run.checkpoint_dir is None:
            continue
        keep = run.best_checkpoint() if run.name in reported else None
        for name in (BEST, LAST):
            if run.checkpoint_dir / name != keep:
                (run.checkpoint_dir / name).unlink(missing_ok=True)


def _disk_summary(out: Path, kept: list[str]) -> str:
    """One line: how much the demo left in ``out``, and which weights it kept.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> _ = (out / "metrics.json").write_bytes(b"x" * 2_500_000)
        >>> _disk_summary(out, ["alexnet bs8"])  # doctest: +ELLIPSIS
        'wrote 2.5 MB to ...: 0.0 MB of it in checkpoints/ (the best weights of alexnet bs8)'
    """

    def size(folder: Path) -> float:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6

    checkpoints = out / "checkpoints"
    in_checkpoints = size(checkpoints) if checkpoints.is_dir() else 0.0
    return (
        f"wrote {size(out):.1f} MB to {out}: {in_checkpoints:.1f} MB of it in checkpoints/ "
        f"(the best weights of {', '.join(kept)})"
    )


def _explorer(
    model: torch.nn.Module,
    splits: DatasetSplits,
    index: Any,
    queries: Any,
    runs: list[study.WidthRun],
    retrieval: dict[str, Any],
    out: Path,
    similarity: dict[str, Any] | None = None,
) -> Path:
    from featurescope.pages import UnitsSpec
    from featurescope.study._experiments import UNIT_STAGES
    from featurescope.study._search import ImageSearch
    from featurescope.study.explorer import write_explorer

    search = ImageSearch(model, index, root=splits.train.root, class_names=splits.classes)
    return write_explorer(
        out / "explorer.html",
        search,
        queries.paths,
        query_labels=[int(v) for v in queries.labels],
        runs={run.name: run.history for run in runs},
        metrics={"trained": retrieval["trained"], "random weights": retrieval["random_weights"]},
        k=retrieval["k"],
        title="featurescope demo: the AlexNet study, to explore",
        splits=("test", "training"),
        similarity=similarity,
        # The fourth experiment, to click through: each stage's strongest channels with their
        # top images and patches, the strongest one projected (a page of every channel of
        # AlexNet would carry tens of thousands of pictures; units/units.json lists them all).
        units=UnitsSpec(UNIT_STAGES, k=9, projections=("deconvnet",), project_top=1, channels=32),
    )


def summary_table(metrics: dict[str, Any]) -> str:
    """The demo's results as a plain-text table: each run, the retrieval scores, the times.

    Example:
        >>> print(summary_table({
        ...     "width_comparison": {"runs": [{"run": "alexnet bs8", "epochs": 4,
        ...         "seconds": 30.0, "final_train_acc": 0.6, "best_val_acc": 0.7}]},
        ...     "retrieval": {"k": 10, "trained": {"precision_at_k": 0.5,
        ...         "mean_average_precision_at_r": 0.4}, "random_weights": {
        ...         "precision_at_k": 0.3, "mean_average_precision_at_r": 0.2}},
        ...     "seconds": {"width_comparison": 31.0, "total": 40.0}}))
        run                  epochs  seconds  train acc  best val acc
        alexnet bs8               4     30.0      0.600         0.700
        search by image (k=10)  precision@k  mAP@R
          trained                     0.500  0.400
          random weights              0.300  0.200
        time: width_comparison 31 s, total 40 s
    """

    def num(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [f"{'run':<20} {'epochs':>6} {'seconds':>8} {'train acc':>10} {'best val acc':>13}"]
    for row in metrics["width_comparison"]["runs"]:
        lines.append(
            f"{row['run']:<20} {row['epochs']:>6} {num(row.get('seconds'), '.1f'):>8} "
            f"{num(row.get('final_train_acc'), '.3f'):>10} {num(row.get('best_val_acc'), '.3f'):>13}"
        )
    retrieval = metrics["retrieval"]
    head = f"search by image (k={retrieval['k']})"
    lines.append(f"{head:<22} {'precision@k':>12} {'mAP@R':>6}")
    for name, key in (("trained", "trained"), ("random weights", "random_weights")):
        scores = retrieval[key]
        lines.append(
            f"  {name:<20} {num(scores['precision_at_k'], '.3f'):>12} "
            f"{num(scores['mean_average_precision_at_r'], '.3f'):>6}"
        )
    times = ", ".join(f"{name} {value:.0f} s" for name, value in metrics["seconds"].items())
    lines.append(f"time: {times}")
    return "\n".join(lines)
