"""Data: the study's preprocessing, image folders and the bundled synthetic dataset."""

from featurescope.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STUDY_PREPROCESSING,
    Preprocessing,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "STUDY_PREPROCESSING", "Preprocessing"]
