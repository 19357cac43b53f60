"""The model zoo: both AlexNets of the study, torchvision's classification models, timm's when
installed, and any plugin's models.

``_registry`` holds the names (one :class:`~featurescope.plugins.Registry` fed by the
``featurescope_register_models`` hook and :func:`register_model`; :func:`model_spec` reads how
a model is built and fed), ``_factory`` builds (:func:`create_model`), ``_download`` fetches
pretrained weights into torch's and Hugging Face's hub caches (:func:`fetch_weights`),
:mod:`~featurescope.zoo.metadata` types what a built model is (:func:`model_metadata`), and
:mod:`~featurescope.zoo.checkpoints` reads and writes weight files. The builtin models are
ordinary plugin modules: :mod:`~featurescope.zoo.alexnet`,
:mod:`~featurescope.zoo.torchvision_models`.
"""

from featurescope.zoo._factory import (
    DEFAULT_NUM_CLASSES,
    convert_checkpoint,
    create_model,
    fetch_weights,
    load_checkpoint,
)
from featurescope.zoo._registry import MODELS, ModelSpec, list_models, model_spec, register_model
from featurescope.zoo.alexnet import AlexNet
from featurescope.zoo.checkpoints import (
    load_weights,
    read_checkpoint_metadata,
    read_state_dict,
    save_checkpoint,
)
from featurescope.zoo.metadata import (
    ModelMetadata,
    attach_metadata,
    model_metadata,
    model_name,
    resolve_preprocessing,
)

__all__ = [
    "DEFAULT_NUM_CLASSES",
    "MODELS",
    "AlexNet",
    "ModelMetadata",
    "ModelSpec",
    "attach_metadata",
    "convert_checkpoint",
    "create_model",
    "fetch_weights",
    "list_models",
    "load_checkpoint",
    "load_weights",
    "model_metadata",
    "model_name",
    "model_spec",
    "read_checkpoint_metadata",
    "read_state_dict",
    "register_model",
    "resolve_preprocessing",
    "save_checkpoint",
]
