"""Feature maps of any layout as ``[C, h, w]``: conv maps, ViT tokens, channels-last Swin maps.

A convolution gives ``[C, H, W]``; a ViT block ``[tokens, C]`` (a class token, then one token per
image patch, row by row); a Swin stage ``[H, W, C]`` (channels last). The builtin visualizers draw
all three as ``[C, h, w]`` through :func:`as_maps`: the layout is read from the shape unless
``layout=`` says it, and a token sequence is laid out on its patch grid (from the image and
patch size, or as the one square that fits), its class token dropped.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from featurescope.errors import InputShapeError, VisualizationError
from featurescope.visualizers._common import to_numpy

__all__ = ["LAYOUTS", "as_maps"]

#: Tokens before the patches a grid may leave over: a class token, a distillation token (DeiT),
#: register tokens (timm's ``*_reg4``); more than this means the grid is wrong.
_MAX_PREFIX = 5

#: ``layout=`` values: ``[C, H, W]`` (or ``[H, W]``), ``[H, W, C]``, ``[tokens, C]``.
LAYOUTS = ("chw", "hwc", "tokens")


def _pair(value: Any, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in pair
    ):
        raise VisualizationError(
            f"{name} must be a positive int or a pair (height, width), got {value!r}"
        )
    return int(pair[0]), int(pair[1])


def _square_side(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


def _prefix_fits(tokens: int, grid: tuple[int, int]) -> bool:
    return grid[0] * grid[1] > 0 and 0 <= tokens - grid[0] * grid[1] <= _MAX_PREFIX


def _fits_square(tokens: int) -> bool:
    return tokens > 1 and (_square_side(tokens) is not None or _square_side(tokens - 1) is not None)


def _guess(arr: np.ndarray[Any, Any], grid: tuple[int, int] | None) -> str:
    if arr.ndim == 2:
        tokens, channels = arr.shape
        if grid is not None:
            return "tokens" if _prefix_fits(tokens, grid) else "chw"
        # A square [H, W] map stays one; [tokens, C] fits a square (after a class token).
        return "tokens" if tokens != channels and channels > 1 and _fits_square(tokens) else "chw"
    if arr.ndim == 3:
        a, b, c = arr.shape
        if b == c:
            return "chw"
        if a == b and c > a:
            return "hwc"  # a square map with more channels than its side: channels last
        if a == 1 and c > 1 and (grid is not None or _fits_square(b)):
            return "tokens"  # [1, tokens, C]: one sample of a ViT's output
    return "chw"


def _token_maps(
    tokens: np.ndarray[Any, Any], grid: tuple[int, int] | None, shape: list[int]
) -> np.ndarray[Any, Any]:
    count, channels = tokens.shape
    if grid is None:
        for prefix in (0, 1):  # no class token, or one
            side = _square_side(count - prefix)
            if side is not None:
                grid = (side, side)
                break
    if grid is None or not _prefix_fits(count, grid):
        have = f"a {grid[0]}×{grid[1]} patch grid" if grid else "a square patch grid"
        raise InputShapeError(
            f"cannot lay out a token map of shape {shape} ({count} tokens × {channels} channels) "
            f"on {have} (plus class tokens). Pass image_size= and patch_size= (e.g. "
            "model.image_size, model.patch_size), or layout='chw'/'hwc' if it is not tokens."
        )
    prefix = count - grid[0] * grid[1]  # class (and register) tokens come first
    maps: np.ndarray[Any, Any] = tokens[prefix:].reshape(grid[0], grid[1], channels)
    return np.ascontiguousarray(maps.transpose(2, 0, 1))


def as_maps(
    data: Any,
    layout: str | None = None,
    *,
    image_size: Any = None,
    patch_size: Any = None,
    what: str = "feature map",
) -> np.ndarray[Any, Any]:
    """One sample's feature map, of any layout, as a float64 ``[C, h, w]`` array.

    Args:
        data: ``[C, H, W]``, ``[H, W]``, ``[H, W, C]``, ``[tokens, C]``, or any of them with a
            leading batch of one; a torch tensor or NumPy array.
        layout: ``"chw"``, ``"hwc"`` or ``"tokens"``; ``None`` guesses from the shape:
            ``[a, b, b]`` is channels-first; ``[a, a, c]`` with ``c > a`` channels-last;
            ``[1, tokens, C]``, and a non-square 2-D ``[tokens, C]``, are tokens when they fit
            the patch grid (or a square, after a class token); anything else channels-first.
            Pass ``layout`` where a shape could be read both ways.
        image_size: the model's input side (or ``(height, width)``), with ``patch_size``, to lay
            tokens out on the model's patch grid; without them the grid is the square that fits.
        patch_size: the model's patch side (or ``(height, width)``).
        what: what ``data`` is, for error messages.

    Returns:
        ``[C, h, w]``; for tokens, the class (prefix) tokens are dropped.

    Raises:
        InputShapeError: no layout fits the shape; the message names it.
        VisualizationError: ``layout``, ``image_size`` or ``patch_size`` is not a valid value.

    Example:
        >>> import numpy as np
        >>> as_maps(np.zeros((1, 197, 768))).shape  # ViT-B/16 at 224 px: class token + 14×14
        (768, 14, 14)
        >>> as_maps(np.zeros((1, 7, 7, 768))).shape  # a Swin stage, channels last
        (768, 7, 7)
        >>> as_maps(np.zeros((50, 8)), image_size=(16, 48), patch_size=4).shape
        (8, 4, 12)
    """
    if layout is not None and layout not in LAYOUTS:
        raise VisualizationError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
    image, patch = _pair(image_size, "image_size"), _pair(patch_size, "patch_size")
    if (image is None) != (patch is None):
        raise VisualizationError(
            "image_size and patch_size go together (the patch grid is their quotient); "
            f"got image_size={image_size!r}, patch_size={patch_size!r}"
        )
    grid = (image[0] // patch[0], image[1] // patch[1]) if image and patch else None
    arr = to_numpy(data, what)
    shape = list(arr.shape)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    chosen = layout or _guess(arr, grid)
    if chosen == "tokens" and arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if 0 in arr.shape:
        raise InputShapeError(f"{what} is empty: shape {shape}")
    if chosen == "tokens" and arr.ndim == 2:
        return _token_maps(arr, grid, shape)
    if chosen == "hwc" and arr.ndim == 3:
        return np.ascontiguousarray(arr.transpose(2, 0, 1))
    if chosen == "chw" and arr.ndim in (2, 3):
        return arr[None] if arr.ndim == 2 else arr
    hint = (
        f" It holds a batch of {shape[0]}; pass one sample, e.g. maps[0]."
        if len(shape) == 4 or (len(shape) == 3 and chosen == "tokens")
        else ""
    )
    raise InputShapeError(
        f"{what} of shape {shape} fits no layout{f' {chosen!r}' if layout else ''}: expected "
        f"[C, H, W] or [H, W] ('chw'), [H, W, C] ('hwc') or [tokens, C] ('tokens'), each "
        f"optionally with a leading batch of one.{hint}"
    )
