"""The gallery's 2-D map as the app's page reads it: one binary array."""

from __future__ import annotations

import struct

import torch

__all__ = ["pack_points"]


def pack_points(ids: torch.Tensor, xy: torch.Tensor) -> bytes:
    """The map as the page reads it: ``n`` (uint32), then ``n`` int32 ids, then ``n`` pairs of
    float32 coordinates, little-endian: 12 bytes a point.

    Example:
        >>> raw = pack_points(torch.tensor([7, 9]), torch.tensor([[0.5, 1.0], [2.0, -1.0]]))
        >>> len(raw), struct.unpack("<I2i4f", raw)
        (28, (2, 7, 9, 0.5, 1.0, 2.0, -1.0))
    """
    n = len(ids)
    head = struct.pack("<I", n)
    body = ids.to(torch.int32).numpy().astype("<i4").tobytes()
    coords = xy.to(torch.float32).numpy().astype("<f4").tobytes()
    return head + body + coords
