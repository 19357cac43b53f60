"""The ``similarity`` visualizer: a node × node heat map of representation similarity (CKA)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from featurescope.errors import InputShapeError
from featurescope.hookspecs import hookimpl
from featurescope.visualizers._common import new_figure, to_numpy

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["similarity"]


def _labels(given: Sequence[str] | None, found: Any, count: int, side: str) -> list[str]:
    labels = list(given if given is not None else (found or range(count)))
    if len(labels) != count:
        raise InputShapeError(
            f"the matrix has {count} {side} but {len(labels)} node names were given for them"
        )
    return [str(label) for label in labels]


def similarity(
    data: Any,
    *,
    nodes_a: Sequence[str] | None = None,
    nodes_b: Sequence[str] | None = None,
    label_a: str | None = None,
    label_b: str | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    values: bool = True,
    size: float = 0.75,
) -> Figure:
    """Draw a similarity matrix: rows are nodes of model A, columns nodes of model B.

    Colours run over the fixed range [0, 1] of CKA, so figures of different comparisons read
    alike; each cell prints its value, with ``*`` where it comes from the minibatch estimator,
    and ``n/a`` where it is undefined (NaN).

    Args:
        data: a :class:`featurescope.compare.Comparison` (its node names, model names and estimators
            label the figure), or any ``[rows, columns]`` matrix (tensor, array, nested lists).
        nodes_a: row names; default the comparison's, or 0, 1, ...
        nodes_b: column names.
        label_a: the rows' axis label; default the comparison's model A name.
        label_b: the columns' axis label.
        title: the figure's title; default ``"linear CKA over N images"`` for a comparison.
        cmap: a matplotlib colormap name.
        values: print each cell's value in it.
        size: inches per cell (the figure is at least 3 inches a side).

    Returns:
        A figure with the heat map's axes and its colour bar's.

    Raises:
        InputShapeError: ``data`` is not a 2-D matrix, or the names do not match its shape.

    Example:
        >>> import torch
        >>> fig = similarity(torch.tensor([[1.0, 0.4], [0.3, 0.9]]), nodes_a=["conv1", "fc"],
        ...                  nodes_b=["conv1", "fc"])
        >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
        ['conv1', 'fc']
        >>> sorted(t.get_text() for t in fig.axes[0].texts)
        ['0.30', '0.40', '0.90', '1.00']
    """
    matrix = to_numpy(getattr(data, "matrix", data), "similarity matrix")
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise InputShapeError(
            f"similarity draws a [rows, columns] matrix, got shape {list(matrix.shape)}"
        )
    rows, cols = matrix.shape
    names_a = _labels(nodes_a, getattr(data, "nodes_a", None), rows, "rows")
    names_b = _labels(nodes_b, getattr(data, "nodes_b", None), cols, "columns")
    estimators = getattr(data, "estimators", None)
    label_a = label_a if label_a is not None else getattr(data, "model_a", None)
    label_b = label_b if label_b is not None else getattr(data, "model_b", None)
    if title is None and hasattr(data, "num_images"):
        title = f"linear CKA over {data.num_images} images"

    import matplotlib as mpl

    fig = new_figure(max(3.0, size * cols + 1.6), max(3.0, size * rows + 1.0))
    ax = fig.add_subplot(1, 1, 1)
    colormap = mpl.colormaps[cmap].with_extremes(bad="lightgrey")
    image = ax.imshow(matrix, cmap=colormap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(
        range(cols),
        names_b,
        rotation=45 if max(map(len, names_b)) > 4 else 0,
        ha="right" if max(map(len, names_b)) > 4 else "center",
    )
    ax.set_yticks(range(rows), names_a)
    if label_a:
        ax.set_ylabel(str(label_a))
    if label_b:
        ax.set_xlabel(str(label_b))
    if values:
        for i in range(rows):
            for j in range(cols):
                value = float(matrix[i, j])
                star = "*" if estimators is not None and estimators[i][j] == "minibatch" else ""
                text = "n/a" if math.isnan(value) else f"{value:.2f}{star}"
                # Dark cells of viridis get white text, light ones black.
                shade = "white" if math.isnan(value) or value < 0.6 else "black"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="black" if math.isnan(value) else shade,
                )
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


@hookimpl
def featurescope_register_visualizers() -> Mapping[str, Callable[..., Figure]]:
    return {"similarity": similarity}
