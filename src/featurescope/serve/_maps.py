"""A photo's feature maps and Grad-CAM as the page draws them: 8-bit, base64, per channel.

Each channel is scaled to 0-255 on its own (the study's per-channel figure does the same), so
a tile shows the channel's shape whatever its magnitude; its range travels beside it. Maps
larger than :data:`MAX_MAP_SIDE` a side are average-pooled by a whole factor first.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "CAM_SIDE",
    "MAX_MAP_SIDE",
    "channels_first",
    "encode_cam",
    "encode_stage",
    "quantise",
    "resolve_nodes",
    "shrink",
]

#: Maps larger than this a side are average-pooled by a whole factor to at most this size.
MAX_MAP_SIDE = 64
#: Side in pixels of the Grad-CAM map sent to the page.
CAM_SIDE = 56


def quantise(values: torch.Tensor) -> torch.Tensor:
    """Each leading slice of ``values`` scaled to 0-255 on its own, as ``uint8``; a constant
    slice is all zeros.

    Example:
        >>> quantise(torch.tensor([[0.0, 2.0, 4.0], [5.0, 5.0, 5.0]])).tolist()
        [[0, 128, 255], [0, 0, 0]]
    """
    flat = values.reshape(values.shape[0], -1).float()
    lo = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - lo
    scaled = torch.where(span > 0, (flat - lo) / span.clamp(min=1e-30), torch.zeros_like(flat))
    return (scaled * 255).round().to(torch.uint8).reshape(values.shape)


def shrink(maps: torch.Tensor, side: int = MAX_MAP_SIDE) -> torch.Tensor:
    """``[C, h, w]`` maps average-pooled by a whole factor until neither side exceeds ``side``.

    Example:
        >>> shrink(torch.ones(2, 112, 100)).shape
        torch.Size([2, 56, 50])
        >>> shrink(torch.ones(2, 13, 13)).shape
        torch.Size([2, 13, 13])
    """
    factor = math.ceil(max(maps.shape[-2:]) / side)
    if factor <= 1:
        return maps
    return F.avg_pool2d(maps[None], factor, ceil_mode=True)[0]


def _b64(values: torch.Tensor) -> str:
    return base64.b64encode(values.contiguous().numpy().tobytes()).decode("ascii")


def encode_stage(name: str, position: int, maps: torch.Tensor) -> dict[str, Any]:
    """One stage's ``[C, H, W]`` maps for the page: every channel's tile and their sum.

    Returns:
        ``{"name", "label", "shape": [C, H, W], "shipped": [C, h, w], "tiles": base64 of
        C x h x w bytes (row-major, channel by channel), "sum": base64 of h x w bytes,
        "means": each channel's spatial mean, "ranges": each channel's [min, max]}``.

    Example:
        >>> stage = encode_stage("layer1", 0, torch.arange(8.0).view(2, 2, 2))
        >>> stage["label"], stage["shipped"], list(base64.b64decode(stage["tiles"]))
        ('stage 1 (2×2)', [2, 2, 2], [0, 85, 170, 255, 0, 85, 170, 255])
    """
    maps = maps.float()
    small = shrink(maps)
    flat = small.reshape(small.shape[0], -1)
    lows, highs = flat.min(dim=1).values.tolist(), flat.max(dim=1).values.tolist()
    return {
        "name": name,
        "label": f"stage {position + 1} ({maps.shape[-2]}×{maps.shape[-1]})",
        "shape": list(maps.shape),
        "shipped": list(small.shape),
        "tiles": _b64(quantise(small)),
        "sum": _b64(quantise(small.sum(dim=0)[None])[0]),
        "means": [float(f"{m:.5g}") for m in maps.mean(dim=(1, 2)).tolist()],
        "ranges": [
            [float(f"{lo:.5g}"), float(f"{hi:.5g}")] for lo, hi in zip(lows, highs, strict=True)
        ],
    }


def encode_cam(cam: torch.Tensor) -> str:
    """A ``[H, W]`` Grad-CAM map at :data:`CAM_SIDE` a side, scaled by its maximum to 0-255.

    Example:
        >>> len(base64.b64decode(encode_cam(torch.rand(224, 224)))) == CAM_SIDE * CAM_SIDE
        True
    """
    small = F.adaptive_avg_pool2d(cam.float()[None, None], CAM_SIDE)[0, 0]
    top = float(small.max())
    scaled = small / top if top > 0 else torch.zeros_like(small)
    return _b64((scaled.clamp(0, 1) * 255).round().to(torch.uint8))


def channels_first(maps: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` maps, permuted from ``[N, H, W, C]`` where that is what they are (Swin's
    stages): square maps whose channel count differs from their side.

    Example:
        >>> channels_first(torch.zeros(1, 56, 56, 96)).shape
        torch.Size([1, 96, 56, 56])
    """
    if maps.shape[1] == maps.shape[2] and maps.shape[2] != maps.shape[3]:
        return maps.permute(0, 3, 1, 2)
    return maps


def resolve_nodes(names: Sequence[str], wanted: Sequence[str]) -> dict[str, str]:
    """``{wanted: graph node}``: a module prefix (``"fc"``) is the last node under it, as
    torchvision reads it.

    Example:
        >>> resolve_nodes(["x", "fc.0", "fc.1", "out"], ["fc", "out"])
        {'fc': 'fc.1', 'out': 'out'}
    """
    resolved = {}
    for query in wanted:
        under = [n for n in names if n.startswith(query + ".")]
        resolved[query] = query if query in names or not under else under[-1]
    return resolved
