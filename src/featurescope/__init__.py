"""featurescope: see inside convolutional networks.

Tap any layer's outputs (:class:`FeatureTap`), search images by their embeddings
(:class:`EmbeddingIndex`), build the study's AlexNets by name (:func:`create_model`), and draw
what you find with plugin visualizers.

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
from featurescope.errors import (
    CheckpointError,
    EmbeddingIndexError,
    EmptyDatasetError,
    FeaturescopeError,
    FeaturescopeWarning,
    IndexFileError,
    InputShapeError,
    NodeNotFoundError,
    PluginError,
    UnknownNameError,
    UnsafeCheckpointError,
    VisualizationError,
    WeightsUnavailableError,
)
from featurescope.hookspecs import hookimpl

if TYPE_CHECKING:  # what _LAZY imports at run time, spelled out for type checkers
    from featurescope.compare import Comparison, compare
    from featurescope.data import ImageFolder, load_image_folders, make_synthetic_dataset
    from featurescope.data.transforms import STUDY_PREPROCESSING, Preprocessing
    from featurescope.index import (
        EmbeddingIndex,
        SearchConfig,
        SearchResult,
        ShardedEmbeddingIndex,
        retrieval_metrics,
    )
    from featurescope.plugins import list_plugins, register_plugin, unregister_plugin
    from featurescope.study import ImageSearch
    from featurescope.tap import (
        FeatureTap,
        ReceptiveField,
        get_graph_node_names,
        grad_cam,
        receptive_field,
        receptive_fields,
    )
    from featurescope.train import History, train
    from featurescope.units import (
        TopActivations,
        merge_top_activations,
        patch,
        project,
        top_activations,
    )
    from featurescope.visualizers import get_visualizer, list_visualizers, save_figure, visualize
    from featurescope.zoo import (
        AlexNet,
        ModelInfo,
        ModelMetadata,
        ModelSpec,
        convert_checkpoint,
        create_model,
        fetch_weights,
        get_model_info,
        list_models,
        load_checkpoint,
        model_metadata,
        read_checkpoint_metadata,
        register_model,
        resolve_preprocessing,
        save_checkpoint,
    )

#: The public names that need torch, by the module they come from: imported on first use.
_LAZY_MODULES: dict[str, tuple[str, ...]] = {
    "featurescope.compare": ("Comparison", "compare"),
    "featurescope.data": ("ImageFolder", "load_image_folders", "make_synthetic_dataset"),
    "featurescope.data.transforms": ("STUDY_PREPROCESSING", "Preprocessing"),
    "featurescope.index": (
        "EmbeddingIndex",
        "SearchConfig",
        "SearchResult",
        "ShardedEmbeddingIndex",
        "retrieval_metrics",
    ),
    "featurescope.plugins": ("list_plugins", "register_plugin", "unregister_plugin"),
    "featurescope.study": ("ImageSearch",),
    "featurescope.tap": (
        "FeatureTap",
        "ReceptiveField",
        "get_graph_node_names",
        "grad_cam",
        "receptive_field",
        "receptive_fields",
    ),
    # tap/__init__.py belongs to another change in flight; it can re-export these later.
    "featurescope.train": ("History", "train"),
    "featurescope.units": (
        "TopActivations",
        "merge_top_activations",
        "patch",
        "project",
        "top_activations",
    ),
    "featurescope.visualizers": ("get_visualizer", "list_visualizers", "save_figure", "visualize"),
    "featurescope.zoo": (
        "AlexNet",
        "ModelInfo",
        "ModelMetadata",
        "ModelSpec",
        "convert_checkpoint",
        "create_model",
        "fetch_weights",
        "get_model_info",
        "list_models",
        "load_checkpoint",
        "model_metadata",
        "read_checkpoint_metadata",
        "register_model",
        "resolve_preprocessing",
        "save_checkpoint",
    ),
}
_LAZY = {name: module for module, names in _LAZY_MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    """Import a public name (``fs.create_model``) or a subpackage (``fs.tap``) on first use."""
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}"):
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """This package's module type: a subpackage imported after the public name it shares
    (``featurescope.train``, the function and the subpackage) does not replace that name."""

    def __setattr__(self, name: str, value: Any) -> None:
        # The import system binds each newly imported subpackage on its parent package.
        if not (name in _LAZY and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "STUDY_PREPROCESSING",
    "AlexNet",
    "CheckpointError",
    "Comparison",
    "EmbeddingIndex",
    "EmbeddingIndexError",
    "EmptyDatasetError",
    "FeatureTap",
    "FeaturescopeError",
    "FeaturescopeWarning",
    "History",
    "ImageFolder",
    "ImageSearch",
    "IndexFileError",
    "InputShapeError",
    "ModelInfo",
    "ModelMetadata",
    "ModelSpec",
    "NodeNotFoundError",
    "PluginError",
    "Preprocessing",
    "ReceptiveField",
    "SearchConfig",
    "SearchResult",
    "ShardedEmbeddingIndex",
    "TopActivations",
    "UnknownNameError",
    "UnsafeCheckpointError",
    "VisualizationError",
    "WeightsUnavailableError",
    "__version__",
    "compare",
    "convert_checkpoint",
    "create_model",
    "fetch_weights",
    "get_graph_node_names",
    "get_model_info",
    "get_visualizer",
    "grad_cam",
    "hookimpl",
    "list_models",
    "list_plugins",
    "list_visualizers",
    "load_checkpoint",
    "load_image_folders",
    "make_synthetic_dataset",
    "merge_top_activations",
    "model_metadata",
    "patch",
    "project",
    "read_checkpoint_metadata",
    "receptive_field",
    "receptive_fields",
    "register_model",
    "register_plugin",
    "resolve_preprocessing",
    "retrieval_metrics",
    "save_checkpoint",
    "save_figure",
    "top_activations",
    "train",
    "unregister_plugin",
    "visualize",
]
