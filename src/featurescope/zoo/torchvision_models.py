"""torchvision's AlexNet (64-192-384-256-256, 4096-wide classifier) as a builtin zoo plugin."""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featurescope.data.transforms import Preprocessing
from featurescope.errors import FeaturescopeError, WeightsUnavailableError
from featurescope.hookspecs import hookimpl
from featurescope.zoo._registry import ModelSpec

__all__ = ["tv_alexnet"]

TV_PREPROCESSING = Preprocessing(resize=256, crop=224)


def _cached_weights_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _imagenet_state_dict(weights: Any, progress: bool) -> Mapping[str, torch.Tensor]:
    cached = _cached_weights_path(weights.url)
    if cached.is_file():
        state: Mapping[str, torch.Tensor] = torch.load(
            cached, map_location="cpu", weights_only=True
        )
        return state
    try:
        return weights.get_state_dict(progress=progress, check_hash=True)  # type: ignore[no-any-return]
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise WeightsUnavailableError(
            f"torchvision's ImageNet AlexNet weights are not cached and could not be downloaded "
            f"({type(exc).__name__}: {exc}). Download {weights.url} on a machine with network "
            f"access and copy it to {cached} (torch.hub.get_dir()/checkpoints; set TORCH_HOME "
            "to move it), then try again."
        ) from exc


def tv_alexnet(
    num_classes: int = 5, weights: str | bool | None = None, progress: bool = True, **kwargs: Any
) -> nn.Module:
    """torchvision's AlexNet; ``weights="IMAGENET1K_V1"`` (or ``True``) loads its ImageNet weights.

    With weights and ``num_classes != 1000``, the ImageNet head is replaced by a freshly
    initialised ``Linear(4096, num_classes)``, ready for fine-tuning.

    Raises:
        WeightsUnavailableError: weights were asked for but are neither in torch's hub cache nor
            downloadable; the message names the file and where to put it.
    """
    from torchvision.models import AlexNet_Weights, alexnet

    if not weights:
        return alexnet(weights=None, num_classes=num_classes, **kwargs)  # type: ignore[no-any-return]
    try:
        enum = AlexNet_Weights.DEFAULT if weights is True else AlexNet_Weights.verify(weights)
    except (ValueError, KeyError) as exc:
        known = ", ".join(w.name for w in AlexNet_Weights)
        raise FeaturescopeError(
            f"unknown weights {weights!r} for tv_alexnet; use one of {known}, True, or None"
        ) from exc
    model = alexnet(weights=None, num_classes=1000, **kwargs)
    model.load_state_dict(_imagenet_state_dict(enum, progress))
    if num_classes != 1000:
        classifier: nn.Sequential = model.classifier
        classifier[6] = nn.Linear(4096, num_classes)
    return model  # type: ignore[no-any-return]


@hookimpl
def featurescope_register_models() -> Mapping[str, ModelSpec]:
    return {
        "tv_alexnet": ModelSpec(
            tv_alexnet,
            TV_PREPROCESSING,
            "torchvision's AlexNet, convs 64-192-384-256-256, 4096-wide classifier",
            ("features", "avgpool", "classifier"),
            "classifier.5",
        ),
    }
