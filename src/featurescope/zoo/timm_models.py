"""timm's models as ``timm/<name>``, when timm is installed (``pip install 'featurescope[timm]'``).

An ordinary builtin plugin: without timm it registers nothing and says nothing. Each entry's
preprocessing is read from timm's ``pretrained_cfg`` (input size, ``crop_pct``, interpolation,
mean, std); its embedding and stage nodes are found by the same rule as torchvision's on the
built model. Pretrained weights are fetched as timm fetches them: from the Hugging Face Hub
through ``huggingface_hub.hf_hub_download`` into its cache (``model.safetensors`` preferred to
``pytorch_model.bin``), or, for weights timm knows only by URL, into torch's hub cache. A file
either cache already holds is used without a request, and with ``FEATURESCOPE_OFFLINE=1`` or
``HF_HUB_OFFLINE=1`` nothing is downloaded (see :mod:`featurescope.zoo._download`).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from featurescope.data.transforms import Preprocessing
from featurescope.errors import FeaturescopeError
from featurescope.hookspecs import hookimpl
from featurescope.zoo._download import fetch_hf, fetch_url, torch_hub_path
from featurescope.zoo._registry import ModelSpec

__all__ = ["PREFIX", "build", "fetch_weights", "preprocessing_of"]

PREFIX = "timm/"
#: timm's safetensors alternatives of pickled files (``timm.models._hub._get_safe_alternatives``).
_SAFE_ALTERNATIVES = {
    "pytorch_model.bin": "model.safetensors",
    "open_clip_pytorch_model.bin": "open_clip_model.safetensors",
}


def _available() -> bool:
    return importlib.util.find_spec("timm") is not None


def preprocessing_of(cfg: Any) -> Preprocessing:
    """timm's eval transform as a :class:`~featurescope.data.Preprocessing`.

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


def _hub_filenames(filename: str | None) -> tuple[str, ...]:
    """The names timm tries in a Hub repository, in its order: the safetensors one first."""
    name = filename or "pytorch_model.bin"
    if name in _SAFE_ALTERNATIVES:
        return _SAFE_ALTERNATIVES[name], name
    if name.endswith(".bin"):
        return name.removesuffix(".bin") + ".safetensors", name
    return (name,)


def fetch_weights(name: str, weights: Any = True) -> Path:
    """The file of timm ``name``'s pretrained weights, from a cache or downloaded as timm does.

    Both caches timm reads are looked in first (Hugging Face's, then torch's hub cache for its
    URL-only weights); then the file is downloaded from where timm would take it: the Hub when
    the weights have a ``hf_hub_id``, else their URL.

    Args:
        name: a timm model name without ``timm/`` (``"resnet18"``).
        weights: ``True`` for its default pretrained tag, or a tag (``"a1_in1k"``).

    Raises:
        WeightsUnavailableError: the file is in no cache and could not be downloaded.
    """
    from timm.models import get_pretrained_cfg

    full = name if weights is True else f"{name}.{weights}"
    try:
        cfg = get_pretrained_cfg(full)
    except RuntimeError as exc:  # an unknown tag
        raise FeaturescopeError(f"timm has no pretrained weights {full!r}: {exc}") from exc
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise FeaturescopeError(f"timm has no pretrained weights {full!r}")
    what = f"pretrained weights of timm's {full}"
    url = cfg.url if isinstance(cfg.url, str) and cfg.url else None
    if url is not None and (not cfg.hf_hub_id or torch_hub_path(url).is_file()):
        return fetch_url(url, what=what, check_hash=False)
    repo, _, revision = str(cfg.hf_hub_id).partition("@")
    return fetch_hf(repo, _hub_filenames(cfg.hf_hub_filename), revision=revision or None, what=what)


def build(name: str, num_classes: int = 1000, weights: Any = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name)``; pretrained weights are fetched first if not cached.

    Raises:
        WeightsUnavailableError: the weights are in no cache and could not be downloaded.
    """
    import timm

    if not weights:
        model: nn.Module = timm.create_model(
            name, pretrained=False, num_classes=num_classes, **kwargs
        )
        return model
    path = fetch_weights(name, weights)
    pretrained: nn.Module = timm.create_model(
        name if weights is True else f"{name}.{weights}",
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
        weights_source="timm",
        pretrained_classes=int(cfg.num_classes) if cfg.has_weights and cfg.num_classes else None,
        describe=_describe,
        fetch=lambda weights=True, _name=name: fetch_weights(_name, weights),
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
