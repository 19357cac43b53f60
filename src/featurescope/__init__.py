"""featurescope: see inside convolutional networks.

Tap any layer's outputs (:class:`FeatureTap`), search images by their embeddings
(:class:`EmbeddingIndex`, :class:`ImageSearch`), build models by name (:func:`create_model`),
see what a channel responds to (:func:`receptive_field`, :func:`top_activations`) and draw
what you find (:func:`visualize`). The root holds what a first session needs; the rest
lives in its sub-package: :mod:`featurescope.zoo` (checkpoints, registration, specs),
:mod:`featurescope.tap`, :mod:`featurescope.index`, :mod:`featurescope.units`,
:mod:`featurescope.compare`, :mod:`featurescope.visualizers`, :mod:`featurescope.plugins`,
:mod:`featurescope.data`, :mod:`featurescope.train`, :mod:`featurescope.study` and
:mod:`featurescope.errors`.

``import featurescope`` does not import torch: each public name is imported from its module on
first use (PEP 562), so that ``featurescope --help`` answers at once.

Example:
    >>> import featurescope as fs
    >>> fs.list_models("alexnet*")
    ['alexnet', 'alexnet_half']
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

from featurescope._version import __version__
from featurescope.errors import FeaturescopeError, FeaturescopeWarning
from featurescope.hookspecs import hookimpl

if TYPE_CHECKING:  # what _LAZY imports at run time, spelled out for type checkers
    from featurescope.compare import compare
    from featurescope.index import EmbeddingIndex, SearchResult
    from featurescope.pages import write_explorer
    from featurescope.study import ImageSearch
    from featurescope.tap import (
        FeatureTap,
        get_graph_node_names,
        grad_cam,
        load_features,
        receptive_field,
        receptive_fields,
        tappable_nodes,
    )
    from featurescope.units import top_activations
    from featurescope.visualizers import visualize
    from featurescope.zoo import create_model, list_models, model_metadata

#: The public names that need torch, by the module they come from: imported on first use.
_LAZY_MODULES: dict[str, tuple[str, ...]] = {
    "featurescope.compare": ("compare",),
    "featurescope.index": ("EmbeddingIndex", "SearchResult"),
    "featurescope.pages": ("write_explorer",),
    "featurescope.study": ("ImageSearch",),
    "featurescope.tap": (
        "FeatureTap",
        "get_graph_node_names",
        "grad_cam",
        "load_features",
        "receptive_field",
        "receptive_fields",
        "tappable_nodes",
    ),
    "featurescope.units": ("top_activations",),
    "featurescope.visualizers": ("visualize",),
    "featurescope.zoo": ("create_model", "list_models", "model_metadata"),
}
_LAZY = {name: module for module, names in _LAZY_MODULES.items() for name in names}

#: Where each name that left the root in 0.2.0 lives now (see the changelog); a lookup of the
#: old name raises an AttributeError that says so, for one release.
_MOVED: dict[str, str] = {
    **{
        name: f"featurescope.errors.{name}"
        for name in (
            "CheckpointError",
            "EmbeddingIndexError",
            "EmptyDatasetError",
            "IndexFileError",
            "InputShapeError",
            "NodeNotFoundError",
            "PluginError",
            "UnknownNameError",
            "UnsafeCheckpointError",
            "VisualizationError",
            "WeightsUnavailableError",
        )
    },
    **{
        name: f"featurescope.zoo.{name}"
        for name in (
            "AlexNet",
            "ModelMetadata",
            "ModelSpec",
            "convert_checkpoint",
            "fetch_weights",
            "load_checkpoint",
            "read_checkpoint_metadata",
            "register_model",
            "resolve_preprocessing",
            "save_checkpoint",
        )
    },
    "ModelInfo": "featurescope.zoo.ModelSpec",
    "get_model_info": "featurescope.zoo.model_spec",
    "Comparison": "featurescope.compare.Comparison",
    "ImageFolder": "featurescope.data.ImageFolder",
    "load_image_folders": "featurescope.data.load_image_folders",
    "make_synthetic_dataset": "featurescope.data.make_synthetic_dataset",
    "Preprocessing": "featurescope.data.Preprocessing",
    "STUDY_PREPROCESSING": "featurescope.data.STUDY_PREPROCESSING",
    "SearchConfig": "featurescope.index.SearchConfig",
    "ShardedEmbeddingIndex": "featurescope.index.ShardedEmbeddingIndex",
    "retrieval_metrics": "featurescope.index.retrieval_metrics",
    "list_plugins": "featurescope.plugins.list_plugins",
    "register_plugin": "featurescope.plugins.register_plugin",
    "unregister_plugin": "featurescope.plugins.unregister_plugin",
    "ReceptiveField": "featurescope.tap.ReceptiveField",
    "History": "featurescope.train.History",
    "TopActivations": "featurescope.units.TopActivations",
    "merge_top_activations": "featurescope.units.merge_top_activations",
    "patch": "featurescope.units.patch",
    "project": "featurescope.units.project",
    "get_visualizer": "featurescope.visualizers.get_visualizer",
    "list_visualizers": "featurescope.visualizers.list_visualizers",
    "save_figure": "featurescope.visualizers.save",
}


def _moved_error(name: str) -> AttributeError:
    new = _MOVED[name]
    module, _, attribute = new.rpartition(".")
    return AttributeError(
        f"featurescope.{name} moved to {new} in featurescope 0.2.0: "
        f"use 'from {module} import {attribute}' (see the changelog)"
    )


def __getattr__(name: str) -> Any:
    """Import a public name (``fs.create_model``) or a subpackage (``fs.tap``) on first use."""
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif name in _MOVED:
        raise _moved_error(name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}"):
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """This package's module type: importing the subpackage :mod:`featurescope.compare` does not
    replace the function :func:`featurescope.compare` that shares its name."""

    def __setattr__(self, name: str, value: Any) -> None:
        # The import system binds each newly imported subpackage on its parent package.
        if not (name in _LAZY and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "EmbeddingIndex",
    "FeatureTap",
    "FeaturescopeError",
    "FeaturescopeWarning",
    "ImageSearch",
    "SearchResult",
    "__version__",
    "compare",
    "create_model",
    "get_graph_node_names",
    "grad_cam",
    "hookimpl",
    "list_models",
    "load_features",
    "model_metadata",
    "receptive_field",
    "receptive_fields",
    "tappable_nodes",
    "top_activations",
    "visualize",
    "write_explorer",
]
