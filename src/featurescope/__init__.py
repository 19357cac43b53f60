"""featurescope: see inside convolutional networks.

Tap any layer's outputs (:class:`FeatureTap`), search images by their embeddings
(:class:`EmbeddingIndex`), build the study's AlexNets by name (:func:`create_model`), and draw
what you find with plugin visualizers.

Example:
    >>> import featurescope as fs
    >>> fs.list_models("alexnet*")
    ['alexnet', 'alexnet_half']
"""

from featurescope._version import __version__
from featurescope.data import ImageFolder, load_image_folders, make_synthetic_dataset
from featurescope.data.transforms import STUDY_PREPROCESSING, Preprocessing
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
from featurescope.index import (
    EmbeddingIndex,
    SearchConfig,
    SearchResult,
    ShardedEmbeddingIndex,
    retrieval_metrics,
)
from featurescope.plugins import list_plugins, register_plugin, unregister_plugin
from featurescope.study import ImageSearch
from featurescope.tap import FeatureTap, get_graph_node_names, grad_cam
from featurescope.train import History, train
from featurescope.visualizers import get_visualizer, list_visualizers, save_figure, visualize
from featurescope.zoo import (
    AlexNet,
    ModelInfo,
    ModelMetadata,
    ModelSpec,
    convert_checkpoint,
    create_model,
    get_model_info,
    list_models,
    load_checkpoint,
    model_metadata,
    read_checkpoint_metadata,
    register_model,
    resolve_preprocessing,
    save_checkpoint,
)

__all__ = [
    "STUDY_PREPROCESSING",
    "AlexNet",
    "CheckpointError",
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
    "SearchConfig",
    "SearchResult",
    "ShardedEmbeddingIndex",
    "UnknownNameError",
    "UnsafeCheckpointError",
    "VisualizationError",
    "WeightsUnavailableError",
    "__version__",
    "convert_checkpoint",
    "create_model",
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
    "model_metadata",
    "read_checkpoint_metadata",
    "register_model",
    "register_plugin",
    "resolve_preprocessing",
    "retrieval_metrics",
    "save_checkpoint",
    "save_figure",
    "train",
    "unregister_plugin",
    "visualize",
]
