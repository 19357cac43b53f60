"""The model registry, after torchvision's ``models/_api.py`` and timm's ``_registry.py``.

Models come from plugins (the builtin AlexNets are plugins too, see
:func:`featurescope.hookspecs.featurescope_register_models`) and from the
:func:`register_model` decorator for models defined in a script or notebook.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from featurescope.data.transforms import Preprocessing
from featurescope.errors import FeaturescopeError, UnknownNameError, did_you_mean

__all__ = [
    "ModelInfo",
    "ModelSpec",
    "create_model",
    "get_model_info",
    "list_models",
    "model_info_of",
    "register_model",
]

Builder = Callable[..., nn.Module]
F = TypeVar("F", bound=Builder)

DEFAULT_NUM_CLASSES = 5


@dataclass(frozen=True)
class ModelSpec:
    """A model builder with what a user needs to feed it.

    Args:
        builder: ``builder(num_classes=..., **kwargs) -> nn.Module``.
        preprocessing: how images must be prepared for it, or ``None`` if unknown.
        description: one line shown by ``featurescope models``.
        stages: names of the submodules that make the study's stages, in order.
        embedding_node: the graph node whose output is the image embedding used for search by
            image (the last hidden layer), e.g. ``"fc.4"`` for the zoo AlexNets.

    Example:
        A plugin returns specs from its ``featurescope_register_models`` hook:

        >>> import torch.nn as nn
        >>> from featurescope import Preprocessing
        >>> spec = ModelSpec(
        ...     lambda num_classes=5: nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes)),
        ...     preprocessing=Preprocessing(resize=36, crop=32),
        ...     description="a linear probe on 32×32 crops",
        ... )
        >>> spec.input_size
        (3, 32, 32)
    """

    builder: Builder
    preprocessing: Preprocessing | None = None
    description: str = ""
    stages: tuple[str, ...] = ()
    embedding_node: str | None = None

    @property
    def input_size(self) -> tuple[int, int, int] | None:
        """The ``[C, H, W]`` the model takes, from its preprocessing."""
        return self.preprocessing.input_size if self.preprocessing else None


@dataclass(frozen=True)
class ModelInfo(ModelSpec):
    """A registered model: its :class:`ModelSpec`, its name, and the plugin that provides it.

    Example:
        >>> info = get_model_info("alexnet_half")
        >>> info.name, info.plugin, info.stages
        ('alexnet_half', 'featurescope.zoo.alexnet', ('conv1', 'conv2', 'conv3', 'fc'))
        >>> info.preprocessing.crop
        227
    """

    name: str = ""
    plugin: str = ""


# Models registered with the decorator, keyed by name; merged after every plugin's models.
_DECORATED: dict[str, ModelSpec] = {}
_DECORATOR_SOURCE = "register_model"


def register_model(
    name: str | F | None = None,
    *,
    preprocessing: Preprocessing | None = None,
    description: str = "",
    stages: tuple[str, ...] = (),
    embedding_node: str | None = None,
) -> Any:
    """Register a model builder under ``name`` (default: the function's name).

    Usable bare (``@register_model``) or with arguments. The builder takes ``num_classes`` and
    any keyword arguments :func:`create_model` passes on. ``preprocessing``, ``description``,
    ``stages`` and ``embedding_node`` are as for :class:`ModelSpec`.

    Raises:
        FeaturescopeError: the name is already taken by another ``register_model`` call.

    Example:
        >>> import torch.nn as nn
        >>> @register_model("tiny_doc", description="a one-layer net")
        ... def tiny(num_classes=5):
        ...     return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
        >>> "tiny_doc" in list_models("tiny*")
        True
        >>> _ = _DECORATED.pop("tiny_doc")  # keep the doctest's registry clean
    """

    def decorator(fn: F) -> F:
        key = name if isinstance(name, str) else fn.__name__
        if key in _DECORATED:
            raise FeaturescopeError(
                f"model {key!r} is already registered by {_DECORATED[key].builder!r}; "
                "choose another name"
            )
        doc = (fn.__doc__ or "").strip().splitlines()
        _DECORATED[key] = ModelSpec(
            builder=fn,
            preprocessing=preprocessing,
            description=description or (doc[0] if doc else ""),
            stages=stages,
            embedding_node=embedding_node,
        )
        return fn

    if callable(name):
        return decorator(name)
    return decorator


def _as_spec(name: str, value: Any, plugin: str) -> ModelSpec:
    if isinstance(value, ModelSpec):
        return value
    if callable(value):
        doc = (getattr(value, "__doc__", None) or "").strip().splitlines()
        return ModelSpec(builder=value, description=doc[0] if doc else "")
    from featurescope.errors import PluginError

    raise PluginError(
        f"plugin {plugin!r} registered model {name!r} as {type(value).__name__}; "
        "expected a ModelSpec or a callable returning an nn.Module"
    )


def _registry() -> dict[str, ModelInfo]:
    from featurescope.plugins import call_registry_hook

    merged = call_registry_hook("featurescope_register_models", "model", _as_spec)
    infos = {
        name: ModelInfo(**_spec_fields(spec), name=name, plugin=plugin)
        for name, (spec, plugin) in merged.items()
    }
    for name, spec in _DECORATED.items():
        infos[name] = ModelInfo(**_spec_fields(spec), name=name, plugin=_DECORATOR_SOURCE)
    return infos


def _spec_fields(spec: ModelSpec) -> dict[str, Any]:
    return {
        "builder": spec.builder,
        "preprocessing": spec.preprocessing,
        "description": spec.description,
        "stages": spec.stages,
        "embedding_node": spec.embedding_node,
    }


def list_models(pattern: str | None = None) -> list[str]:
    """Names of the registered models, sorted, optionally filtered by a shell-style pattern.

    Example:
        >>> list_models("alexnet*")
        ['alexnet', 'alexnet_half']
    """
    names = sorted(_registry())
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def get_model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered model: builder, preprocessing, stages, plugin.

    Raises:
        UnknownNameError: no model has that name; the message lists the closest names.

    Example:
        >>> get_model_info("alexnet").input_size
        (3, 227, 227)
    """
    registry = _registry()
    try:
        return registry[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown model {name!r}.{did_you_mean(name, registry)} "
            f"Known models: {', '.join(sorted(registry))} (featurescope.list_models())."
        ) from None


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    class_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model by name, optionally loading a checkpoint into it.

    Args:
        name: a name from :func:`list_models`.
        num_classes: size of the classifier's output. Defaults to 5 (the study's classes), to
            the number recorded in ``checkpoint``, or to ``len(class_names)``.
        checkpoint: a featurescope ``.safetensors`` checkpoint or a ``.pt``/``.pth`` state
            dict (read with ``weights_only=True``). Pickled whole models are refused; see
            ``featurescope convert``.
        class_names: the label names in class-index order, kept in ``featurescope_info`` and
            written into checkpoints (default: the checkpoint's).
        **kwargs: passed to the model's builder.

    Returns:
        The model, in eval mode when a checkpoint was loaded. ``model.featurescope_info`` holds
        its name, number of classes and class names.

    Example:
        >>> model = create_model("alexnet")
        >>> sum(p.numel() for p in model.parameters())
        26830213
    """
    info = get_model_info(name)
    names = list(class_names) if class_names is not None else None
    if names is not None and num_classes is None:
        num_classes = len(names)
    if checkpoint is not None:
        from featurescope.zoo.checkpoints import read_checkpoint_metadata

        meta = read_checkpoint_metadata(checkpoint)
        if num_classes is None and meta.get("num_classes") is not None:
            num_classes = int(meta["num_classes"])
        if names is None:
            names = meta.get("class_names")
    num_classes = DEFAULT_NUM_CLASSES if num_classes is None else num_classes
    if not isinstance(num_classes, int) or num_classes < 1:
        raise FeaturescopeError(f"num_classes must be a positive integer, got {num_classes!r}")
    if names is not None and len(names) != num_classes:
        raise FeaturescopeError(f"{len(names)} class names given for {num_classes} classes")
    model = info.builder(num_classes=num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise FeaturescopeError(
            f"the builder of model {name!r} (plugin {info.plugin!r}) returned "
            f"{type(model).__name__}, not a torch.nn.Module"
        )
    model.featurescope_info = {  # type: ignore[assignment]
        "model": name,
        "num_classes": num_classes,
        "class_names": names,
    }
    if checkpoint is not None:
        from featurescope.zoo.checkpoints import load_weights

        load_weights(model, checkpoint)
        model.eval()
    return model


def model_info_of(model: nn.Module) -> ModelInfo | None:
    """The zoo entry a model was created from, or ``None`` for a model built elsewhere."""
    meta = getattr(model, "featurescope_info", None)
    if not isinstance(meta, dict) or "model" not in meta:
        return None
    try:
        return get_model_info(meta["model"])
    except UnknownNameError:
        return None
