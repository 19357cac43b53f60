"""What a zoo model is, typed and set once: the way timm carries ``pretrained_cfg``.

:func:`~featurescope.create_model` attaches a frozen :class:`ModelMetadata` to every model it
builds; everything downstream (the tap's manifests, checkpoints, training, search by image)
reads it through :func:`model_metadata`, the preprocessing through
:func:`resolve_preprocessing` (the one rule for "the model's own, else the study's") and the
model's name through :func:`model_name` (the one rule for "the zoo's name, else the class's").
How a zoo model is built, before it is, is its :class:`~featurescope.zoo.ModelSpec` instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from featurescope.data.transforms import STUDY_PREPROCESSING, Preprocessing
from featurescope.errors import FeaturescopeError

__all__ = [
    "ModelMetadata",
    "attach_metadata",
    "model_metadata",
    "model_name",
    "resolve_preprocessing",
]

_ATTRIBUTE = "featurescope_metadata"


@dataclass(frozen=True)
class ModelMetadata:
    """A zoo model's facts: what it is, what it was trained for, and how to feed and tap it.

    Args:
        architecture: the zoo name it was built from (``"alexnet"``, ``"resnet50"``).
        num_classes: the size of its classifier's output.
        class_names: label names in class-index order, when known.
        preprocessing: how images must be prepared for it; ``None`` if unknown.
        input_size: the ``(C, H, W)`` it takes; defaults to the preprocessing's.
        embedding_node: the graph node whose output is its image embedding (the input of the
            final classifier ``Linear``), for search by image.
        stage_nodes: nodes worth drawing as feature maps, in order (``featurescope maps``).
        weights: where its weights came from: ``"random"``, a pretrained tag such as
            ``"torchvision:IMAGENET1K_V1"``, or ``"checkpoint:<sha256 prefix>"``.

    Example:
        >>> import featurescope as fs
        >>> meta = fs.model_metadata(fs.create_model("alexnet_half", num_classes=3))
        >>> meta.architecture, meta.num_classes, meta.embedding_node, meta.input_size
        ('alexnet_half', 3, 'fc.4', (3, 227, 227))
    """

    architecture: str
    num_classes: int
    class_names: tuple[str, ...] | None = None
    preprocessing: Preprocessing | None = None
    input_size: tuple[int, int, int] | None = None
    embedding_node: str | None = None
    stage_nodes: tuple[str, ...] = ()
    weights: str = "random"

    def __post_init__(self) -> None:
        if self.class_names is not None:
            names = tuple(self.class_names)
            if len(names) != self.num_classes:
                raise FeaturescopeError(
                    f"{len(names)} class names given for {self.num_classes} classes"
                )
            object.__setattr__(self, "class_names", names)
        if self.input_size is None and self.preprocessing is not None:
            object.__setattr__(self, "input_size", self.preprocessing.input_size)

    def replace(self, **changes: Any) -> ModelMetadata:
        """A copy with some fields changed (the metadata itself never changes).

        Example:
            >>> ModelMetadata("alexnet", 2).replace(class_names=["cat", "dog"]).class_names
            ('cat', 'dog')
        """
        return dataclasses.replace(self, **changes)


def attach_metadata(model: nn.Module, metadata: ModelMetadata) -> nn.Module:
    """Set ``model``'s metadata (what :func:`~featurescope.create_model` does); returns ``model``.

    Example:
        >>> import torch.nn as nn
        >>> net = attach_metadata(nn.Linear(4, 2), ModelMetadata("probe", 2))
        >>> model_metadata(net).architecture
        'probe'
    """
    if not isinstance(metadata, ModelMetadata):
        raise FeaturescopeError(f"metadata must be a ModelMetadata, got {type(metadata).__name__}")
    # Not a submodule, buffer or parameter: nn.Module keeps it as a plain attribute.
    object.__setattr__(model, _ATTRIBUTE, metadata)
    return model


def model_metadata(model: nn.Module) -> ModelMetadata | None:
    """The :class:`ModelMetadata` of a zoo model; ``None`` for a model built elsewhere.

    A :class:`~featurescope.FeatureTap` or any wrapper that keeps the model as ``.model`` is
    looked through.

    Example:
        >>> import torch.nn as nn, featurescope as fs
        >>> fs.model_metadata(fs.create_model("alexnet")).architecture
        'alexnet'
        >>> fs.model_metadata(nn.Linear(2, 2)) is None
        True
    """
    meta = getattr(model, _ATTRIBUTE, None)
    if meta is None and isinstance(getattr(model, "model", None), nn.Module):
        meta = getattr(model.model, _ATTRIBUTE, None)
    return meta if isinstance(meta, ModelMetadata) else None


def resolve_preprocessing(
    model: nn.Module | None, preprocessing: Preprocessing | None = None
) -> Preprocessing:
    """The preprocessing to feed ``model``: the one given, else the model's own, else the study's.

    The study's is Resize 256 → CenterCrop 227 → ImageNet mean/std
    (:data:`~featurescope.data.STUDY_PREPROCESSING`).

    Example:
        >>> import torch.nn as nn, featurescope as fs
        >>> resolve_preprocessing(fs.create_model("tv_alexnet")).crop
        224
        >>> resolve_preprocessing(nn.Linear(2, 2)).crop
        227
    """
    if preprocessing is not None:
        return preprocessing
    meta = model_metadata(model) if model is not None else None
    if meta is not None and meta.preprocessing is not None:
        return meta.preprocessing
    return STUDY_PREPROCESSING


def model_name(model: nn.Module) -> str:
    """What to call ``model`` on a page, in a log or a file: its zoo name, else its class name.

    Example:
        >>> import torch.nn as nn, featurescope as fs
        >>> model_name(fs.create_model("alexnet_half")), model_name(nn.Linear(2, 2))
        ('alexnet_half', 'Linear')
    """
    meta = model_metadata(model)
    return meta.architecture if meta is not None else type(model).__name__
