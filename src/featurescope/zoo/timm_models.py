"""timm's models as ``timm/<name>``, when timm is installed (``pip install 'featurescope[timm]'``).

An ordinary builtin plugin: without timm it registers nothing and says nothing. Each entry's
preprocessing is read from timm's ``pretrained_cfg`` (input size, ``crop_pct``, interpolation,
mean, std); its embedding and stage nodes are found by the same rule as torchvision's on the
built model. Pretrained weights load only from a local cache (Hugging Face's hub cache, or
torch's hub cache for weights timm fetches by URL); otherwise
:class:`~featurescope.WeightsUnavailableError` names the file and where to put it, at once.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featurescope.data.transforms import Preprocessing
from featurescope.errors import FeaturescopeError, WeightsUnavailableError
from featurescope.hookspecs import hookimpl
from featurescope.zoo._registry import ModelSpec

__all__ = ["PREFIX", "build", "preprocessing_of"]

PREFIX = "timm/"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _available() -> bool:
    return importlib.util.find_spec("timm") is not None


def preprocessing_of(cfg: Any) -> Preprocessing:
    """timm's eval transform as a :class:`~featurescope.Preprocessing`.

    timm resizes the shorter side to ``floor(size / crop_pct)`` and centre-crops ``size``
    (``timm.data.transforms_factory.transforms_imagenet_eval``).
    """
    size = int(cfg.input_size[-1])
    crop_pct = float(cfg.crop_pct or 0.875)
    interpolation = str(cfg.interpolation or "bilinear")
    if interpolation not in ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"):
        interpolation = "bilinear"  # timm's "random" is for training only
    return Preprocessing(
        resize=math.floor(size / crop_pct),
        crop=size,
        mean=tuple(float(v) for v in cfg.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg.std),  # type: ignore[arg-type]
        interpolation=interpolation,
    )


def _local_weights(name: str, tag: str | None) -> Path:
    """The cached file of ``name``'s pretrained weights; raises if it is not on this machine."""
    from timm.models import get_pretrained_cfg

    full = f"{name}.{tag}" if tag else name
    cfg = get_pretrained_cfg(full)
    if cfg is None:
        raise FeaturescopeError(f"timm has no pretrained weights {full!r}")
    places: list[str] = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        repo = cfg.hf_hub_id.split("@")[0]
        for filename in (cfg.hf_hub_filename, *_WEIGHT_FILES):
            if not filename:
                continue
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return Path(found)
        places.append(
            f"Hugging Face's hub cache ({HF_HUB_CACHE}) as the repository {repo!r} "
            f"(huggingface-cli download {repo} on a machine with network access, then copy the "
            "cache folder; HF_HOME moves it)"
        )
    if isinstance(cfg.url, str) and cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if cached.is_file():
            return cached
        places.append(f"{cached} (download {cfg.url})")
    raise WeightsUnavailableError(
        f"the pretrained weights of timm's {full} are not on this machine, and featurescope "
        f"never downloads. Put them in {' or '.join(places) or 'a local file'}, then try again."
    )


def build(name: str, num_classes: int = 1000, weights: Any = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name)``; pretrained weights only from a local file.

    Raises:
        WeightsUnavailableError: the weights are in no local cache.
    """
    import timm

    if not weights:
        model: nn.Module = timm.create_model(
            name, pretrained=False, num_classes=num_classes, **kwargs
        )
        return model
    tag = None if weights is True else str(weights)
    path = _local_weights(name, tag)
    pretrained: nn.Module = timm.create_model(
        f"{name}.{tag}" if tag else name,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
        num_classes=num_classes,
        **kwargs,
    )
    return pretrained


def _describe(model: nn.Module, input_size: tuple[int, int, int]) -> Mapping[str, Any]:
    from featurescope.zoo.torchvision_models import describe

    try:
        return describe(model, input_size)
    except Exception:
        # Models torch.fx cannot trace (data-dependent control flow) have no node names to give;
        # FeatureTap's hooks backend still taps them by module name.
        return {}


def _spec(name: str) -> ModelSpec | None:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    return ModelSpec(
        lambda num_classes=1000, weights=None, _name=name, **kw: build(
            _name, num_classes, weights, **kw
        ),
        preprocessing_of(cfg),
        f"timm's {name}",
        weights=cfg.tag or None if cfg.has_weights else None,
        pretrained_classes=int(cfg.num_classes) if cfg.has_weights and cfg.num_classes else None,
        describe=_describe,
    )


@hookimpl
def featurescope_register_models() -> Mapping[str, ModelSpec]:
    if not _available():
        return {}
    import timm

    specs = {}
    for name in timm.list_models():
        spec = _spec(name)
        if spec is not None:
            specs[PREFIX + name] = spec
    return specs
