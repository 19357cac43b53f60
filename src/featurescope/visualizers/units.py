"""The ``units`` visualizer: what chosen channels see, their top patches beside projections."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from featurescope.errors import InputShapeError
from featurescope.hookspecs import hookimpl
from featurescope.visualizers._common import new_figure, to_display_image, to_numpy

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["units"]


def _signed(projection: Any) -> np.ndarray[Any, Any]:
    """A projection for display: zero is grey, the strongest value black or white."""
    arr = to_numpy(projection, "projection").astype(np.float64)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    scale = float(np.abs(arr).max(initial=0.0)) or 1.0
    return np.clip(arr / (2 * scale) + 0.5, 0.0, 1.0)


def units(
    data: Sequence[Sequence[Any]],
    *,
    projections: Sequence[Sequence[Any]] | None = None,
    channels: Sequence[int] | None = None,
    title: str | None = None,
    panel_size: float = 0.9,
) -> Figure:
    """Draw, for each chosen channel, its top patches and (beside them) their projections.

    One row per channel, strongest activation first: Zeiler & Fergus's figure. Patches come
    from :func:`featurescope.units.patch`, projections from :func:`featurescope.units.project` cropped to
    the same boxes; projections are drawn signed (grey is zero).

    Args:
        data: per channel, its patches (each ``[3, h, w]``, ``[h, w, 3]`` or ``[h, w]``).
        projections: per channel, one projection per patch, or ``None`` for patches alone.
        channels: the channel numbers, for the row labels (default ``0, 1, ...``).
        title: the figure's title.
        panel_size: inches per panel.

    Returns:
        The figure.

    Raises:
        InputShapeError: no channels, or projections that do not pair with the patches.

    Example:
        >>> import torch
        >>> patches = [[torch.rand(3, 5, 5) for _ in range(3)] for _ in range(2)]
        >>> fig = units(patches, projections=patches, channels=[4, 7])
        >>> len(fig.axes)
        12
    """
    rows = [list(row) for row in data]
    if not rows or not any(rows):
        raise InputShapeError("units takes at least one channel with at least one patch")
    if projections is not None:
        pairs = [list(p) for p in projections]
        if [len(p) for p in pairs] != [len(r) for r in rows]:
            raise InputShapeError(
                "projections must pair with the patches: "
                f"{[len(p) for p in pairs]} projections for {[len(r) for r in rows]} patches"
            )
    labels = list(channels) if channels is not None else list(range(len(rows)))
    k = max(len(r) for r in rows)
    cols = k * (2 if projections is not None else 1) + (1 if projections is not None else 0)
    fig = new_figure(panel_size * cols, panel_size * len(rows) + (0.4 if title else 0.1))
    grid = fig.add_gridspec(len(rows), cols, wspace=0.08, hspace=0.15)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            ax = fig.add_subplot(grid[r, c])
            picture = to_display_image(image, "patch")
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0.0, vmax=1.0)
            ax.set_axis_off()
            if c == 0:
                ax.set_title(f"channel {labels[r]}", fontsize=7, loc="left", pad=2)
            if projections is not None:
                pax = fig.add_subplot(grid[r, k + 1 + c])
                shown = _signed(pairs[r][c])
                pax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0.0, vmax=1.0)
                pax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


@hookimpl
def featurescope_register_visualizers() -> Mapping[str, Callable[..., Figure]]:
    return {"units": units}
