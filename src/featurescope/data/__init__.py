"""Data: the study's preprocessing, image folders and the bundled synthetic dataset."""

from featurescope.data.augment import train_transform
from featurescope.data.folders import (
    IMAGE_EXTENSIONS,
    NO_LABEL,
    DatasetSplits,
    EmptyDatasetError,
    ImageFolder,
    SkippedFilesWarning,
    as_rgb,
    load_image_folders,
    load_rgb,
)
from featurescope.data.synthetic import (
    SYNTHETIC_CLASSES,
    default_data_dir,
    make_synthetic_dataset,
    synthetic_image,
)
from featurescope.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STUDY_PREPROCESSING,
    Preprocessing,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "NO_LABEL",
    "STUDY_PREPROCESSING",
    "SYNTHETIC_CLASSES",
    "DatasetSplits",
    "EmptyDatasetError",
    "ImageFolder",
    "Preprocessing",
    "SkippedFilesWarning",
    "as_rgb",
    "default_data_dir",
    "load_image_folders",
    "load_rgb",
    "make_synthetic_dataset",
    "synthetic_image",
    "train_transform",
]
