"""The ``curves`` visualizer: loss and accuracy per epoch for several training runs."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from featurescope.errors import InputShapeError, VisualizationError
from featurescope.hookspecs import hookimpl
from featurescope.visualizers._common import new_figure
from featurescope.visualizers._titles import fit_suptitle

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["curves"]

History = Mapping[str, Sequence[float]]


def _is_series(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(v, numbers.Real) for v in value)
    ) or (hasattr(value, "ndim") and getattr(value, "ndim", None) == 1)


def _has_to_dict(value: Any) -> bool:
    return callable(getattr(value, "to_dict", None))


def _as_history(run: str, value: Any) -> dict[str, list[float]]:
    # A history is either {metric: per-epoch values} or a list of per-epoch {metric: value},
    # or an object with to_dict() giving the former (featurescope.train.History).
    items: Iterable[tuple[Any, Any]]
    if _has_to_dict(value) and not isinstance(value, Mapping):
        value = value.to_dict()
        if not isinstance(value, Mapping):
            raise InputShapeError(
                f"run {run!r}: to_dict() must return {{metric: [value per epoch]}}, got "
                f"{type(value).__name__}"
            )
        items = value.items()
    elif isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, Sequence) and all(isinstance(r, Mapping) for r in value):
        keys = list(dict.fromkeys(k for record in value for k in record))
        items = [(key, [record.get(key, float("nan")) for record in value]) for key in keys]
    else:
        raise InputShapeError(
            f"run {run!r}: a history must be {{metric: [value per epoch]}} or a list of "
            f"per-epoch {{metric: value}} records, got {type(value).__name__}"
        )
    history: dict[str, list[float]] = {}
    for key, series in items:
        if not _is_series(series):
            continue
        history[str(key)] = [float(v) for v in series]
    return history


def _as_runs(data: Any) -> dict[str, dict[str, list[float]]]:
    if _has_to_dict(data) and not isinstance(data, Mapping):
        return {"run": _as_history("run", data)}  # one History on its own
    if not isinstance(data, Mapping) or not data:
        raise InputShapeError(
            "curves takes {run name: history}, e.g. {'alexnet bs8': {'train_loss': [...], "
            f"'val_acc': [...]}}}}, got {type(data).__name__}"
        )
    if all(_is_series(v) for v in data.values()):
        return {"run": _as_history("run", data)}  # one run's history on its own
    return {str(run): _as_history(str(run), history) for run, history in data.items()}


def _style(metric: str) -> str:
    lowered = metric.lower()
    if lowered.startswith(("val", "valid", "test", "eval")):
        return "--"
    return "-" if lowered.startswith("train") else ":"


def _plot(ax: Axes, runs: dict[str, dict[str, list[float]]], word: str, ylabel: str) -> bool:
    import matplotlib as mpl

    palette = mpl.colormaps["tab10"]
    drawn = False
    for r, (run, history) in enumerate(runs.items()):
        epochs = history.get("epoch")
        for metric, values in history.items():
            if word not in metric.lower() or metric == "epoch":
                continue
            xs = epochs if epochs and len(epochs) == len(values) else range(1, len(values) + 1)
            ax.plot(
                list(xs),
                values,
                _style(metric),
                color=palette(r % palette.N),
                marker="o",
                markersize=3,
                label=f"{run} {metric}",
            )
            drawn = True
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"no {ylabel} recorded", ha="center", va="center", transform=ax.transAxes)
    return drawn


def curves(data: Any, *, title: str | None = None, size: float = 4.0) -> Figure:
    """Draw loss and accuracy per epoch for several runs, side by side, one colour per run.

    Metrics whose name contains ``loss`` go in the left panel, those containing ``acc`` in the
    right; ``train_*`` lines are solid, ``val_*``/``test_*`` dashed. An ``epoch`` series, when
    present, gives the x values.

    Args:
        data: ``{run name: history}``, where a history is ``{metric: [value per epoch]}``, a
            list of per-epoch ``{metric: value}`` records, or a :class:`featurescope.train.History`
            (anything with a ``to_dict()`` giving the first form); a single history also works.
        title: the figure's title.
        size: each panel's height in inches.

    Returns:
        A figure with two axes: loss, then accuracy.

    Raises:
        InputShapeError: ``data`` is not a mapping of histories.
        VisualizationError: no run has any loss or accuracy series.

    Example:
        >>> runs = {"bs8": {"train_loss": [1.2, 0.8], "val_acc": [0.4, 0.6]},
        ...         "bs32": {"train_loss": [1.4, 1.0], "val_acc": [0.3, 0.5]}}
        >>> fig = curves(runs)
        >>> [ax.get_ylabel() for ax in fig.axes]
        ['loss', 'accuracy']
    """
    runs = _as_runs(data)
    fig = new_figure(size * 2.4, size)
    loss_ax = fig.add_subplot(1, 2, 1)
    acc_ax = fig.add_subplot(1, 2, 2)
    any_loss = _plot(loss_ax, runs, "loss", "loss")
    any_acc = _plot(acc_ax, runs, "acc", "accuracy")
    if not (any_loss or any_acc):
        metrics = sorted({m for h in runs.values() for m in h})
        raise VisualizationError(
            "curves found no metric named like '*loss*' or '*acc*' in any run; "
            f"the runs have: {', '.join(metrics) or 'no numeric series'}"
        )
    top = 0.95
    if title:
        text, header = fit_suptitle(title, fig.get_figwidth())
        fig.suptitle(text)
        top = max(0.5, min(0.88, 1.0 - (header + 0.25) / fig.get_figheight()))  # and the ticks
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.13, top=top, wspace=0.25)
    return fig


@hookimpl
def featurescope_register_visualizers() -> Mapping[str, Callable[..., Figure]]:
    return {"curves": curves}
