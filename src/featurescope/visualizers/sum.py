"""The ``sum`` visualizer: a feature map summed over its channels, with a colour bar."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from featurescope.hookspecs import hookimpl
from featurescope.visualizers._common import new_figure
from featurescope.visualizers._layout import as_maps
from featurescope.visualizers._titles import place_title, room_for_title, title_size

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["channel_sum"]


def channel_sum(
    data: Any,
    *,
    cmap: str = "viridis",
    title: str | None = None,
    colorbar: bool = True,
    size: float = 4.0,
    layout: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    patch_size: int | tuple[int, int] | None = None,
) -> Figure:
    """Draw the sum over channels of a ``[C, H, W]`` feature map, in activation units.

    This is the study's channel-summed view (``maps[0].sum(0)`` for a ``[1, C, H, W]`` batch):
    where the layer as a whole responds, whichever channel carries the response.

    Args:
        data: the map, ``[C, H, W]`` (``[1, C, H, W]`` and ``[H, W]`` also work), a torch tensor
            or NumPy array.
        cmap: a matplotlib colormap name.
        title: the axes' title; default ``"sum over C channels"``.
        colorbar: draw a colour bar (a second axes) with the summed values.
        size: the figure's height in inches.
        layout: how ``data`` is laid out: ``"chw"``, ``"hwc"`` (channels last, as Swin's
            stages) or ``"tokens"`` (``[tokens, C]``, as ViT's blocks); ``None`` reads it from
            the shape (see :func:`featurescope.visualizers.as_maps`).
        image_size: with ``patch_size``, the model's input side (or ``(height, width)``), to
            lay tokens out on its patch grid; without them a token map must fit a square
            (after a class token).
        patch_size: the model's patch side (or ``(height, width)``), e.g. ``model.patch_size``.

    Returns:
        A figure with the map's axes, and the colour bar's axes when ``colorbar`` is true.

    Raises:
        InputShapeError: ``data`` is not a single feature map (of any layout above).

    Example:
        >>> import torch
        >>> fig = channel_sum(torch.rand(4, 6, 6))
        >>> len(fig.axes)
        2
    """
    maps = as_maps(data, layout, image_size=image_size, patch_size=patch_size)
    total = maps.sum(axis=0)
    fig = new_figure(size * 1.25 if colorbar else size, size)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(total, cmap=cmap, interpolation="nearest")
    ax.set_axis_off()
    if colorbar:
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    text = title if title is not None else f"sum over {len(maps)} channels"
    if text:  # wrapped to the axes as finally placed across, with room made above them
        header = place_title(fig, ax, text, title_size(size))
        fig.subplots_adjust(top=room_for_title(fig, header))
    return fig


@hookimpl
def featurescope_register_visualizers() -> Mapping[str, Callable[..., Figure]]:
    return {"sum": channel_sum}
