"""The model zoo: both AlexNets of the study, torchvision's, and any plugin's models."""

from featurescope.zoo._registry import (
    ModelInfo,
    ModelSpec,
    create_model,
    get_model_info,
    list_models,
    model_info_of,
    register_model,
)
from featurescope.zoo.alexnet import AlexNet
from featurescope.zoo.checkpoints import (
    convert_checkpoint,
    load_checkpoint,
    load_weights,
    read_checkpoint_metadata,
    read_state_dict,
    save_checkpoint,
)

__all__ = [
    "AlexNet",
    "ModelInfo",
    "ModelSpec",
    "convert_checkpoint",
    "create_model",
    "get_model_info",
    "list_models",
    "load_checkpoint",
    "load_weights",
    "model_info_of",
    "read_checkpoint_metadata",
    "read_state_dict",
    "register_model",
    "save_checkpoint",
]
