"""How pictures and maps travel in a page: JPEG ``data:`` URLs and 8-bit zlib-packed maps."""

from __future__ import annotations

import base64
import io
import math
import zlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from featurescope.data.transforms import Preprocessing

#: Side in pixels of the feature-map canvases and of each query's picture.
DISPLAY_SIZE = 160
#: Side in pixels of a gallery image's thumbnail.
THUMB = 72
#: Maps larger than this a side are average-pooled by a whole factor to at most this size: the
#: page draws them on :data:`DISPLAY_SIZE` canvases, and the pixels cost the most bytes.
MAX_MAP_SIDE = 32
_JPEG_QUALITY = 82


def packed(values: torch.Tensor) -> str:
    """Each leading slice of ``values`` scaled to 0-255 on its own, as zlib-compressed base64.

    Example:
        >>> import base64, zlib, torch
        >>> raw = zlib.decompress(base64.b64decode(packed(torch.tensor([[0.0, 2.0, 4.0]]))))
        >>> list(raw)
        [0, 128, 255]
    """
    flat = values.reshape(values.shape[0], -1).float()
    lo = flat.min(dim=-1, keepdim=True).values
    span = flat.max(dim=-1, keepdim=True).values - lo
    scaled = torch.where(span > 0, (flat - lo) / span.clamp(min=1e-30), torch.zeros_like(flat))
    raw = (scaled * 255).round().to(torch.uint8).numpy().tobytes()
    return base64.b64encode(zlib.compress(raw, 6)).decode("ascii")


def shrink(maps: torch.Tensor, side: int = MAX_MAP_SIDE) -> torch.Tensor:
    """``[C, h, w]`` maps average-pooled by a whole factor until neither side exceeds ``side``.

    Example:
        >>> shrink(torch.ones(2, 112, 100)).shape
        torch.Size([2, 28, 25])
    """
    factor = math.ceil(max(maps.shape[-2:]) / side)
    if factor <= 1:
        return maps
    return F.avg_pool2d(maps[None], factor, ceil_mode=True)[0]


def data_url(picture: Any) -> str:
    """A PIL image as an inline JPEG ``data:`` URL."""
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=_JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def model_view(tensor: torch.Tensor, preprocessing: Preprocessing, side: int = DISPLAY_SIZE) -> str:
    """The preprocessed input as the model saw it, for overlays that line up with its maps."""
    import numpy as np
    from PIL import Image

    rgb = preprocessing.denormalize(tensor).clamp(0, 1).permute(1, 2, 0).numpy()
    picture = Image.fromarray((rgb * 255).round().astype(np.uint8))
    return data_url(picture.resize((side, side), Image.Resampling.BILINEAR))


def thumbnail(path: str, side: int = THUMB) -> str | None:
    """A square thumbnail read as the model reads the file (``load_rgb``), or ``None`` if the
    file is not there or does not decode."""
    from PIL import ImageOps

    from featurescope.data.folders import load_rgb

    try:
        picture = load_rgb(path)
    except (OSError, ValueError):
        return None
    return data_url(ImageOps.fit(picture, (side, side)))


def picture_url(image: torch.Tensor, side: int | None = None, *, signed: bool = False) -> str:
    """A ``[3, H, W]`` (or ``[H, W]``) picture in ``[0, 1]`` as a JPEG ``data:`` URL, its longer
    side scaled to ``side`` (nearest, so that small patches stay crisp).

    With ``signed``, the picture is a projection: zero is mid-grey and the strongest value,
    of either sign, black or white (as the ``units`` visualizer draws it).

    Example:
        >>> picture_url(torch.zeros(3, 4, 4), 8).startswith("data:image/jpeg;base64,")
        True
    """
    import numpy as np
    from PIL import Image

    values = image.detach().double().cpu()
    if values.dim() == 2:
        values = values[None].expand(3, -1, -1)
    if signed:
        scale = float(values.abs().max()) or 1.0
        values = values / (2 * scale) + 0.5
    rgb = (values.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(rgb)
    if side is not None:
        height, width = rgb.shape[:2]
        scale = side / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        picture = picture.resize(size, Image.Resampling.NEAREST)
    return data_url(picture)
