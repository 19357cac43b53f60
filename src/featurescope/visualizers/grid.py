"""The ``grid`` visualizer: every channel of a feature map as a small image, strongest first."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from featurescope.errors import VisualizationError
from featurescope.hookspecs import hookimpl
from featurescope.visualizers._common import check_positive_int, new_figure, normalize01
from featurescope.visualizers._layout import as_maps
from featurescope.visualizers._titles import fit_suptitle

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["grid"]

_ORDERS = ("mean", "l2", None)
_NORMALIZE = ("channel", "global")


def _strength(maps: np.ndarray[Any, Any], order: str) -> np.ndarray[Any, Any]:
    flat = maps.reshape(len(maps), -1)
    if order == "mean":
        strength: np.ndarray[Any, Any] = flat.mean(axis=1)
    else:
        strength = np.linalg.norm(flat, axis=1)
    return strength


def grid(
    data: Any,
    *,
    max_channels: int | None = 64,
    order: str | None = "mean",
    normalize: str = "channel",
    cmap: str = "viridis",
    ncols: int | None = None,
    title: str | None = None,
    panel_size: float = 1.0,
    layout: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    patch_size: int | tuple[int, int] | None = None,
) -> Figure:
    """Draw every channel of a ``[C, H, W]`` feature map as its own small image.

    This is the study's loop over ``feature_map[0, i]`` as one figure. Each panel is captioned
    with its channel index.

    Args:
        data: the map, ``[C, H, W]`` (``[1, C, H, W]`` and ``[H, W]`` also work), a torch tensor
            or NumPy array.
        max_channels: draw at most this many channels (``None``: all of them).
        order: ``"mean"`` (default) or ``"l2"`` draws the strongest channels first, by mean
            activation or by L2 norm; ``None`` keeps channel order.
        normalize: ``"channel"`` scales each channel to its own [min, max], so weak channels
            still show their pattern; ``"global"`` shares one scale, so strengths compare.
        cmap: a matplotlib colormap name.
        ncols: panels per row; default about the square root of the number shown.
        title: the figure's title.
        panel_size: each panel's side in inches.
        layout: how ``data`` is laid out: ``"chw"``, ``"hwc"`` (channels last, as Swin's
            stages) or ``"tokens"`` (``[tokens, C]``, as ViT's blocks); ``None`` reads it from
            the shape (see :func:`featurescope.visualizers.as_maps`).
        image_size: with ``patch_size``, the model's input side (or ``(height, width)``), to
            lay tokens out on its patch grid; without them a token map must fit a square
            (after a class token).
        patch_size: the model's patch side (or ``(height, width)``), e.g. ``model.patch_size``.

    Returns:
        A figure with one axes per channel shown.

    Raises:
        InputShapeError: ``data`` is not a single feature map (of any layout above).
        VisualizationError: an option has a value this function cannot use.

    Example:
        >>> import torch
        >>> fig = grid(torch.rand(8, 5, 5), max_channels=6)
        >>> len(fig.axes)
        6
    """
    maps = as_maps(data, layout, image_size=image_size, patch_size=patch_size)
    cap = check_positive_int(max_channels, "max_channels", allow_none=True)
    if order not in _ORDERS:
        raise VisualizationError(f"order must be one of {_ORDERS}, got {order!r}")
    if normalize not in _NORMALIZE:
        raise VisualizationError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
    channels = np.arange(len(maps))
    if order is not None:
        # A stable sort keeps channel order among ties, so equal channels draw predictably.
        channels = np.argsort(-_strength(maps, order), kind="stable")
    channels = channels[:cap]
    shown = maps[channels]
    shown = normalize01(shown, axes=(1, 2)) if normalize == "channel" else normalize01(shown)

    n = len(channels)
    cols = check_positive_int(ncols, "ncols", allow_none=True) or math.ceil(math.sqrt(n))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    heading, header = fit_suptitle(title, cols * panel_size) if title else ("", 0.0)
    header = max(header, 0.5) if title else 0.0
    fig = new_figure(cols * panel_size, rows * panel_size * 1.15 + header)
    for i, (channel, image) in enumerate(zip(channels, shown, strict=True)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(image, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(str(int(channel)), fontsize=7, pad=2)
        ax.set_axis_off()
    top = 1.0 - header / fig.get_figheight() - 0.02
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.08, hspace=0.3)
    if title:
        fig.suptitle(heading)
    return fig


@hookimpl
def featurescope_register_visualizers() -> Mapping[str, Callable[..., Figure]]:
    return {"grid": grid}
