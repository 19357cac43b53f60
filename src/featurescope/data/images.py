"""One way to decode an image, for the model and for the eye.

The model reads files through :func:`~featurescope.data.load_rgb`; every display (montages,
overlays, Grad-CAM, the explorer's thumbnails) reads them through it too, and converts an image
already in memory with :func:`as_rgb`, the same conversion. So what is shown is what the model
saw: EXIF orientation applied, 16-bit values scaled to 8 bits (not clipped to white),
transparency composited over white, grey, palette and CMYK images turned into RGB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from featurescope.data.folders import _to_rgb, load_rgb

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["as_rgb", "load_rgb"]


def as_rgb(image: Image.Image) -> Image.Image:
    """An image in memory as 8-bit RGB, converted as :func:`load_rgb` converts a file's.

    Its EXIF orientation is applied (an image fresh from ``Image.open`` still carries it; one
    from :func:`load_rgb` no longer does, so converting twice changes nothing).

    Example:
        >>> import numpy as np
        >>> from PIL import Image
        >>> clear = Image.new("RGBA", (2, 1), (255, 0, 0, 0))  # fully transparent red
        >>> as_rgb(clear).getpixel((0, 0))
        (255, 255, 255)
        >>> as_rgb(Image.fromarray(np.full((1, 2), 32896, np.uint16))).getpixel((0, 0))
        (128, 128, 128)
    """
    from PIL import ImageOps

    upright = ImageOps.exif_transpose(image)
    return _to_rgb(upright if upright is not None else image)
