"""The model registry, after torchvision's ``models/_api.py`` and timm's ``_registry.py``.

Models come from plugins (the builtin AlexNets are plugins too, see
:func:`featurescope.hookspecs.featurescope_register_models`), the models that the
:func:`register_model` decorator registers in a script or notebook included: one builtin plugin,
:mod:`featurescope.zoo.decorated`, gives those.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from featurescope.data.transforms import Preprocessing
from featurescope.errors import FeaturescopeError, PluginError, UnknownNameError
from featurescope.plugins import Registry

__all__ = ["MODELS", "ModelInfo", "ModelSpec", "get_model_info", "list_models", "register_model"]

Builder = Callable[..., nn.Module]
Describer = Callable[[nn.Module, tuple[int, int, int]], Mapping[str, Any]]
Fetcher = Callable[..., Path]
F = TypeVar("F", bound=Builder)


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
        weights: the tag of its default pretrained weights (``"IMAGENET1K_V1"``), passed to the
            builder as ``weights=`` by ``create_model(name, pretrained=True)``; ``None`` if it
            has none.
        pretrained_classes: the number of classes those weights were trained for (1000).
        pretrained_class_names: those classes' names in index order (ImageNet's); a model
            built with its pretrained weights and their class count carries them.
        describe: ``describe(model, input_size) -> {"embedding_node": ..., "stage_nodes": ...}``
            finds those nodes by rule on the built model, where ``embedding_node`` or
            ``stages`` is not given.
        fetch: ``fetch(weights) -> Path``: the file of the pretrained weights ``weights``
            (``True`` or a tag) in its cache, downloaded there if missing, without building
            the model; what :func:`~featurescope.fetch_weights` calls.

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
    weights: str | None = None
    pretrained_classes: int | None = None
    pretrained_class_names: tuple[str, ...] | None = None
    describe: Describer | None = None
    fetch: Fetcher | None = None

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


#: The plugin that gives the models registered with :func:`register_model`.
DECORATED = "featurescope.zoo.decorated"


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

    The model is given to the zoo by one builtin plugin, :mod:`featurescope.zoo.decorated`
    (whose ``remove(name)`` takes it back), like every other model.

    Raises:
        FeaturescopeError: the name is already taken, by an earlier ``register_model`` call
            or by a plugin.

    Example:
        >>> import torch.nn as nn
        >>> @register_model("tiny_doc", description="a one-layer net")
        ... def tiny(num_classes=5):
        ...     return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
        >>> get_model_info("tiny_doc").plugin
        'featurescope.zoo.decorated'
        >>> from featurescope.zoo import decorated
        >>> decorated.remove("tiny_doc")  # keep the registry clean
    """
    from featurescope.zoo import decorated

    def decorator(fn: F) -> F:
        key = name if isinstance(name, str) else fn.__name__
        taken = MODELS.entries().get(key)
        if taken is not None:
            raise FeaturescopeError(
                f"model {key!r} is already registered by plugin {taken.plugin!r} "
                f"({taken.value.builder!r}); choose another name"
            )
        doc = (fn.__doc__ or "").strip().splitlines()
        spec = ModelSpec(
            builder=fn,
            preprocessing=preprocessing,
            description=description or (doc[0] if doc else ""),
            stages=stages,
            embedding_node=embedding_node,
        )
        decorated.add(key, spec)
        return fn

    if callable(name):
        return decorator(name)
    return decorator


def _as_info(name: str, value: Any, plugin: str) -> ModelInfo:
    if isinstance(value, ModelSpec):
        spec = value
    elif callable(value):
        doc = (getattr(value, "__doc__", None) or "").strip().splitlines()
        spec = ModelSpec(builder=value, description=doc[0] if doc else "")
    else:
        raise PluginError(
            f"plugin {plugin!r} registered model {name!r} as {type(value).__name__}; "
            "expected a ModelSpec or a callable returning an nn.Module"
        )
    return ModelInfo(**_spec_fields(spec), name=name, plugin=plugin)


def _spec_fields(spec: ModelSpec) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(ModelSpec)}


#: Every model the plugins (:func:`register_model`'s included) give, by name.
MODELS: Registry[ModelInfo] = Registry(
    "featurescope_register_models", "model", _as_info, lister="featurescope.list_models()"
)


def list_models(pattern: str | None = None) -> list[str]:
    """Names of the registered models, sorted, optionally filtered by a shell-style pattern.

    Example:
        >>> list_models("alexnet*")
        ['alexnet', 'alexnet_half']
    """
    return MODELS.names(pattern)


def get_model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered model: builder, preprocessing, stages, plugin.

    Raises:
        UnknownNameError: no model has that name; the message lists the closest names, or
            says to install timm for a ``timm/<name>`` while timm is not installed.

    Example:
        >>> get_model_info("alexnet").input_size
        (3, 227, 227)
    """
    try:
        return MODELS.get(name).value
    except UnknownNameError:
        # timm_models.PREFIX, spelled out: that plugin module imports this one.
        if name.startswith("timm/") and importlib.util.find_spec("timm") is None:
            raise UnknownNameError(
                f"model {name!r} is one of timm's, and timm is not installed: install timm "
                "(pip install 'featurescope[timm]') to use timm's models as timm/<name>"
            ) from None
        raise
