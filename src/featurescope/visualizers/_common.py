"""What every builtin visualizer needs: arrays from tensors, images from anything, a headless figure.

Figures are built as :class:`matplotlib.figure.Figure` objects, never through pyplot: no global
state, so visualizers are thread-safe and need no backend switch (saving picks Agg, or the SVG or
PDF backend, per file).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from featurescope.errors import InputShapeError, VisualizationError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "as_chw",
    "check_positive_int",
    "new_figure",
    "normalize01",
    "to_display_image",
    "to_numpy",
]


def to_numpy(data: Any, what: str) -> np.ndarray[Any, Any]:
    """``data`` (a torch tensor, NumPy array or nested sequence) as a float64 array."""
    try:
        import torch

        if isinstance(data, torch.Tensor):
            return data.detach().to("cpu", torch.float64).numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    try:
        return np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputShapeError(
            f"{what} must be a torch tensor or a NumPy array, got {type(data).__name__} ({exc})"
        ) from exc


def as_chw(data: Any, what: str = "feature map") -> np.ndarray[Any, Any]:
    """A feature map as a float64 ``[C, H, W]`` array; ``[H, W]`` and ``[1, C, H, W]`` also fit."""
    arr = to_numpy(data, what)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        hint = (
            f" It holds a batch of {arr.shape[0]}; pass one sample, e.g. maps[0]."
            if arr.ndim == 4
            else ""
        )
        raise InputShapeError(
            f"{what} must be [C, H, W] (or [H, W], or [1, C, H, W]) and non-empty, "
            f"got shape {list(arr.shape)}.{hint}"
        )
    return arr


def normalize01(
    x: np.ndarray[Any, Any], axes: tuple[int, ...] | None = None
) -> np.ndarray[Any, Any]:
    """Scale ``x`` to [0, 1] over ``axes`` (all by default); a constant slice becomes 0."""
    lo = np.nanmin(x, axis=axes, keepdims=True)
    hi = np.nanmax(x, axis=axes, keepdims=True)
    span = hi - lo
    out: np.ndarray[Any, Any] = np.divide(x - lo, span, out=np.zeros_like(x), where=span > 0)
    return out


def check_positive_int(value: Any, name: str, allow_none: bool = False) -> int | None:
    """``value`` as a positive int, or a :class:`VisualizationError` naming the option."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        none = " or None" if allow_none else ""
        raise VisualizationError(f"{name} must be a positive integer{none}, got {value!r}")
    return int(value)


def _is_uint8(image: Any) -> bool:
    # torch.uint8 does not compare equal to np.uint8, and read_image() gives torch uint8 images.
    import torch

    if isinstance(image, torch.Tensor):
        return image.dtype == torch.uint8
    return bool(getattr(image, "dtype", None) == np.uint8)


def to_display_image(image: Any, what: str = "image") -> np.ndarray[Any, Any]:
    """An image as a float ``[H, W, 3]`` (or ``[H, W]`` grey) array in [0, 1] for ``imshow``.

    Accepts a PIL image, a path, a ``[3, H, W]``/``[1, 3, H, W]``/``[H, W]`` tensor, or a NumPy
    array laid out ``[H, W, 3]`` (uint8 or float) or ``[3, H, W]``. Files and PIL images are
    decoded as the model reads them (:func:`featurescope.data.load_rgb`, :func:`~featurescope.data.as_rgb`):
    EXIF orientation applied, 16-bit scaled, transparency over white. Float values outside
    [0, 1] (a normalised model input, say) are rescaled to [0, 1] for display only.
    """
    # Decoded exactly as the model reads images, so the display is what the model saw.
    from featurescope.data.folders import as_rgb, load_rgb

    if isinstance(image, (str, os.PathLike)):
        try:
            image = load_rgb(image)
        except (OSError, ValueError) as exc:
            raise VisualizationError(f"cannot read {what} {os.fspath(image)!r}: {exc}") from exc
    if type(image).__module__.startswith("PIL."):
        image = np.asarray(as_rgb(image))
    is_uint8 = _is_uint8(image)
    arr = to_numpy(image, what)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)) or 0 in arr.shape:
        raise InputShapeError(
            f"{what} must be a PIL image, a path, or an array shaped [3, H, W], [H, W, 3] or "
            f"[H, W]; got shape {list(arr.shape)}"
        )
    if is_uint8 or arr.max(initial=0.0) > 1.0 + 1e-6 or arr.min(initial=0.0) < -1e-6:
        arr = arr / 255.0 if is_uint8 else normalize01(arr)
    return arr


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure of ``width`` × ``height`` inches."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))
