"""The study's small training loop and its presets.

:func:`train` fits a classifier with a step learning-rate schedule and safe, resumable
checkpoints; :mod:`featurescope.train.presets` holds the ``quick`` and ``study`` recipes.
"""

from featurescope.train._loop import (
    BEST,
    LAST,
    OPTIMIZERS,
    STUDY_LR_SCHEDULE,
    History,
    LRSchedule,
    kaiming_init_,
    lr_at,
    train,
)

__all__ = [
    "BEST",
    "LAST",
    "OPTIMIZERS",
    "STUDY_LR_SCHEDULE",
    "History",
    "LRSchedule",
    "kaiming_init_",
    "lr_at",
    "train",
]
