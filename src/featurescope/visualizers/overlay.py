"""The ``overlay`` visualizer: a feature map upsampled over the image that produced it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from featurescope.errors import VisualizationError
from featurescope.hookspecs import hookimpl
from featurescope.visualizers._common import (
    new_figure,
    normalize01,
    to_display_image,
)
from featurescope.visualizers._layout import as_maps
from featurescope.visualizers._titles import place_title, room_for_title, title_size

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["overlay", "upsample"]


def upsample(heat: np.ndarray[Any, Any], height: int, width: int) -> np.ndarray[Any, Any]:
    """Resize an ``[h, w]`` map to ``[height, width]`` bilinearly (half-pixel centres).

    Example:
        >>> import numpy as np
        >>> upsample(np.array([[0.0, 1.0]]), 1, 4).round(2).tolist()
        [[0.0, 0.25, 0.75, 1.0]]
    """
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float64))[None, None]
    out = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
    result: np.ndarray[Any, Any] = out[0, 0].numpy()
    return result


def overlay(
    data: Any,
    *,
    image: Any,
    alpha: float = 0.5,
    cmap: str = "jet",
    title: str | None = None,
    colorbar: bool = False,
    size: float = 4.0,
    layout: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    patch_size: int | tuple[int, int] | None = None,
) -> Figure:
    """Draw a feature map, upsampled bilinearly, over the input image: where the layer fires.

    A ``[C, H, W]`` map is summed over its channels first; the result is scaled to [0, 1].

    Args:
        data: the map, ``[H, W]`` or ``[C, H, W]`` (or ``[1, C, H, W]``), tensor or array.
        image: the input image: a PIL image, a path, a ``[3, H, W]`` tensor in [0, 1], or an
            ``[H, W, 3]`` array. A normalised tensor is rescaled to [0, 1] for display; for
            true colours pass the image before normalisation (or
            ``Preprocessing.denormalize``).
        alpha: opacity of the map over the image, in [0, 1].
        cmap: a matplotlib colormap name for the map.
        title: the axes' title, wrapped to the figure's width (never cut).
        colorbar: add a colour bar (a second axes) for the scaled map.
        size: the figure's height in inches.
        layout: how ``data`` is laid out: ``"chw"``, ``"hwc"`` (channels last, as Swin's
            stages) or ``"tokens"`` (``[tokens, C]``, as ViT's blocks); ``None`` reads it from
            the shape (see :func:`featurescope.visualizers.as_maps`).
        image_size: with ``patch_size``, the model's input side (or ``(height, width)``), to
            lay tokens out on its patch grid; without them a token map must fit a square
            (after a class token).
        patch_size: the model's patch side (or ``(height, width)``), e.g. ``model.patch_size``.

    Returns:
        A figure with one axes (two with ``colorbar``).

    Raises:
        InputShapeError: ``data`` is not a map or ``image`` is not an image.
        VisualizationError: ``alpha`` is outside [0, 1] or the image file cannot be read.

    Example:
        >>> import torch
        >>> fig = overlay(torch.rand(16, 6, 6), image=torch.rand(3, 64, 64), alpha=0.4)
        >>> len(fig.axes)
        1
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise VisualizationError(f"alpha must be a number in [0, 1], got {alpha!r}")
    heat = as_maps(data, layout, image_size=image_size, patch_size=patch_size).sum(axis=0)
    picture = to_display_image(image)
    height, width = picture.shape[:2]
    heat = normalize01(upsample(heat, height, width))

    aspect = width / height
    fig = new_figure(size * aspect * (1.25 if colorbar else 1.0), size)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0.0, vmax=1.0)
    heat_image = ax.imshow(heat, cmap=cmap, alpha=float(alpha), vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    # Adjust before adding the colour bar: it takes its room from the axes as placed now.
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.98)
    if colorbar:
        fig.colorbar(heat_image, ax=ax, fraction=0.046, pad=0.04)
    if title:  # wrapped to the axes as finally placed across, with room made above them
        header = place_title(fig, ax, title, title_size(size))
        fig.subplots_adjust(top=room_for_title(fig, header))
    return fig


@hookimpl
def featurescope_register_visualizers() -> Mapping[str, Callable[..., Figure]]:
    return {"overlay": overlay}
