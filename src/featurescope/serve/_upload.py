"""Uploaded photos, decoded safely: bounded in bytes and in pixels, held in memory only.

An upload is read from the request's stream and counted as it arrives, so a client that lies
about (or omits) its ``Content-Length`` still cannot send more than the limit. The image's
header is read before any pixel is decoded: an image whose size exceeds the pixel limit (a
decompression bomb: a few kilobytes that decode to gigabytes) is refused before it allocates
anything. Nothing is written to disk.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from featurescope.errors import FeaturescopeError

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["FORMATS", "Limits", "RequestError", "decode_image"]

#: The image formats an upload may be in (PIL's names); others are refused unread.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class RequestError(FeaturescopeError):
    """A request the app refuses, with the HTTP status to answer and a message for the user.

    Example:
        >>> err = RequestError(413, "too large")
        >>> err.status, str(err)
        (413, 'too large')
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What an upload may be.

    Args:
        max_bytes: the largest upload accepted, in bytes (default 20 MiB).
        max_pixels: the most pixels (width x height) a photo may decode to (default 40
            megapixels: a 40 MP photo decodes to 120 MB of RGB; PIL's own bomb check is at 89).

    Example:
        >>> Limits().max_bytes
        20971520
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise FeaturescopeError(
                f"upload limits must be positive, got max_bytes={self.max_bytes}, "
                f"max_pixels={self.max_pixels}"
            )


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """``data`` decoded as an 8-bit RGB photo, as :func:`featurescope.data.load_rgb` decodes a
    file (EXIF orientation applied, 16-bit scaled, transparency over white).

    Raises:
        RequestError: 413 when the image is larger than ``limits.max_pixels`` (checked from its
            header, before decoding), 415 when it is not an image in one of :data:`FORMATS`,
            422 when it is one but does not decode (truncated, damaged).

    Example:
        >>> import io
        >>> from PIL import Image
        >>> buffer = io.BytesIO()
        >>> Image.new("L", (3, 2), 128).save(buffer, format="PNG")
        >>> image = decode_image(buffer.getvalue(), Limits())
        >>> image.mode, image.size
        ('RGB', (3, 2))
        >>> decode_image(b"hello", Limits())
        Traceback (most recent call last):
        ...
        featurescope.serve._upload.RequestError: the upload is not an image (JPEG, PNG, WEBP, GIF, BMP or TIFF)
    """
    from PIL import Image, UnidentifiedImageError

    from featurescope.data.folders import as_rgb

    if not data:
        raise RequestError(400, "the request carries no image: send the photo's bytes as its body")
    named = ", ".join(FORMATS[:-1]) + " or " + FORMATS[-1]
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own check (its warning is an error under the command line's filters); ours,
        # below, is stricter. warnings.catch_warnings is not used: it is not thread-safe.
        raise RequestError(413, _too_many_pixels(None, limits, str(exc))) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise RequestError(415, f"the upload is not an image ({named})") from exc
    width, height = image.size
    if width * height > limits.max_pixels:
        raise RequestError(413, _too_many_pixels((width, height), limits))
    try:
        image.load()
        return as_rgb(image)
    except Exception as exc:  # any decoder failure on hostile bytes is the upload's fault
        raise RequestError(422, f"the image does not decode ({type(exc).__name__}: {exc})") from exc


def _too_many_pixels(size: tuple[int, int] | None, limits: Limits, detail: str = "") -> str:
    what = f"{size[0]}x{size[1]} pixels" if size else detail or "too many pixels"
    return (
        f"the image is too large to decode safely ({what}; the limit is "
        f"{limits.max_pixels:,} pixels); send a smaller photo"
    )
