"""A featurescope plugin: per-channel activation histograms, and a tiny conv net."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from featurescope import hookimpl
from featurescope.data import Preprocessing
from featurescope.zoo import ModelSpec

__all__ = ["histogram", "tinynet"]


def histogram(data: Any, *, max_channels: int = 8, bins: int = 30, log: bool = False) -> Any:
    """Draw the distribution of each channel's activations, strongest channels first.

    Args:
        data: a ``[C, H, W]`` feature map (torch tensor or NumPy array).
        max_channels: how many channels to draw, by descending mean activation.
        bins: histogram bins, shared by all channels.
        log: use a logarithmic count axis (ReLU maps are mostly zeros).

    Returns:
        A matplotlib figure with one axes.
    """
    from matplotlib.figure import Figure

    maps = torch.as_tensor(data).detach().float().cpu()
    if maps.ndim != 3:
        raise ValueError(f"histogram draws one [C, H, W] map, got shape {list(maps.shape)}")
    flat = maps.flatten(1)
    order = flat.mean(1).argsort(descending=True)[:max_channels]
    edges = np.linspace(float(flat.min()), float(flat.max()) + 1e-12, bins + 1)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for c in order.tolist():
        ax.hist(flat[c].numpy(), bins=edges, histtype="step", log=log, label=f"channel {c}")
    ax.set_xlabel("activation")
    ax.set_ylabel("count")
    ax.legend(fontsize=7)
    return fig


def tinynet(num_classes: int = 5, **kwargs: Any) -> nn.Module:
    """Two 3×3 convolutions (8 and 16 channels) and a linear head, for 64×64 images."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


@hookimpl
def featurescope_register_visualizers() -> dict[str, Any]:
    return {"histogram": histogram}


@hookimpl
def featurescope_register_models() -> dict[str, Any]:
    spec = ModelSpec(tinynet, Preprocessing(resize=72, crop=64), "a two-conv net for 64×64 images")
    return {"tinynet": spec}
