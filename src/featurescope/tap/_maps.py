"""Where the spatial axes of a node's output are, read from its shape and the input's size.

A convolution's output is ``[N, C, h, w]`` (``"chw"``); Swin's and ConvNeXt's blocks keep
``[N, h, w, C]`` (``"hwc"``, channels last); a ViT's blocks ``[N, tokens, C]`` (``"tokens"``: a
few class or register tokens, then one token per patch, row by row). The same names as the
visualizers' ``layout=``. A map's spatial axes are those that shrink the input's height and
width by one common stride; a token sequence is a patch grid when its patches are square and
tile the input exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from featurescope.errors import InputShapeError

__all__ = ["LAYOUTS", "MapLayout", "read_layout", "to_chw"]

#: ``layout=`` values, as the visualizers take them.
LAYOUTS = ("chw", "hwc", "tokens")
#: Tokens before the patches a grid may leave over: a class token, a distillation token (DeiT),
#: register tokens (timm's ``*_reg4``); as in the visualizers.
MAX_PREFIX = 5
# How many cells a map's side may be off the input's side divided by the stride: each
# downsampling rounds by under one cell, and earlier roundings shrink with later strides.
_ROUNDING = 1.0


@dataclass(frozen=True)
class MapLayout:
    """How a ``[N, ...]`` output lies over the image.

    Attributes:
        kind: ``"chw"``, ``"hwc"`` or ``"tokens"``.
        grid: ``(h, w)``, the map's spatial size (for tokens, the patch grid).
        prefix: tokens before the patches (class, distillation, register tokens); 0 for maps.
    """

    kind: str
    grid: tuple[int, int]
    prefix: int = 0

    @property
    def spatial(self) -> bool:
        """Whether the map has more than one position (a 1 × 1 pooled map has not)."""
        return self.grid[0] * self.grid[1] > 1


def _mismatch(h: int, w: int, image: tuple[int, int]) -> float | None:
    """How far (in cells) an ``h × w`` grid is from the image shrunk by one common stride.

    ``None`` when it is further than rounding allows, or larger than the image.
    """
    height, width = image
    if not (1 <= h <= height and 1 <= w <= width):
        return None
    # h ≈ height / s and w ≈ width / s, each within rounding: compare h·width with w·height.
    cells = abs(h * width - w * height) / (height + width)
    return cells if cells <= _ROUNDING else None


def _preference(
    miss: float, kind: str, grid: tuple[int, int], channels: int, image: tuple[int, int]
) -> tuple[float, bool, bool, bool]:
    """How to rank two readings of a 4-d shape, best first: the closer fit to the image's
    aspect; then one common whole stride (an image of 8 × 12 is a 4 × 6 grid at stride 2,
    not 6 × 9); then more channels than either side, as in every network; then channels-first.
    """
    (h, w), (height, width) = grid, image
    whole = height % h == 0 and width % w == 0 and height // h == width // w
    return (miss, not whole, channels < max(h, w), kind != "chw")


def _patch_grid(tokens: int, image: tuple[int, int]) -> tuple[tuple[int, int], int] | None:
    height, width = image
    for prefix in range(min(MAX_PREFIX, tokens - 1) + 1):
        patches = tokens - prefix
        # Square patches of side p tiling the image: (height / p) · (width / p) == patches.
        p = math.isqrt(height * width // patches) if patches else 0
        for side in (p, p + 1):
            if side and height % side == 0 and width % side == 0:
                grid = (height // side, width // side)
                if grid[0] * grid[1] == patches:
                    return grid, prefix
    return None


def read_layout(
    shape: Sequence[int], image: tuple[int, int], layout: str | None = None
) -> MapLayout | None:
    """The layout of an output of ``shape`` for an input of ``image`` ``(height, width)``.

    Args:
        shape: the output's shape, batch first.
        image: the input's height and width.
        layout: ``"chw"``, ``"hwc"`` or ``"tokens"`` to say it; ``None`` reads it from the
            shape: the reading whose spatial axes fit the image's aspect better,
            channels-first on a tie.

    Returns:
        The layout, or ``None`` if the shape is not a map over the image in that layout.

    Example:
        >>> read_layout((1, 768, 7, 7), (224, 224))
        MapLayout(kind='chw', grid=(7, 7), prefix=0)
        >>> read_layout((1, 7, 7, 768), (224, 224))
        MapLayout(kind='hwc', grid=(7, 7), prefix=0)
        >>> read_layout((1, 197, 768), (224, 224))
        MapLayout(kind='tokens', grid=(14, 14), prefix=1)
        >>> read_layout((1, 1000), (224, 224)) is None
        True
    """
    kinds = LAYOUTS if layout is None else (layout,)
    if len(shape) == 4:
        _, a, b, c = (int(s) for s in shape)
        candidates: tuple[tuple[str, tuple[int, int], int], ...] = (
            ("chw", (b, c), a),
            ("hwc", (a, b), c),
        )
        readings = [
            (_preference(miss, kind, grid, channels, image), kind, grid)
            for kind, grid, channels in candidates
            if kind in kinds and (miss := _mismatch(*grid, image)) is not None
        ]
        if readings:
            _, kind, grid = min(readings)
            return MapLayout(kind, grid)
    if len(shape) == 3 and "tokens" in kinds:
        found = _patch_grid(int(shape[1]), image)
        if found is not None:
            return MapLayout("tokens", found[0], found[1])
    return None


def to_chw(value: Tensor, layout: MapLayout) -> Tensor:
    """``value`` (batch first, in ``layout``) as ``[N, C, h, w]``, a view where it can be."""
    if layout.kind == "chw":
        return value
    if layout.kind == "hwc":
        return value.permute(0, 3, 1, 2)
    if layout.kind == "tokens":
        n, _, channels = value.shape
        patches = value[:, layout.prefix :]
        return patches.reshape(n, *layout.grid, channels).permute(0, 3, 1, 2)
    raise InputShapeError(f"unknown layout {layout.kind!r}; use one of {LAYOUTS}")
