"""Named recipes for the study's width comparison: ``quick`` (a CPU, minutes) and ``study``.

A :class:`Preset` bundles what the examples and ``featurescope demo`` need to reproduce the
width comparison: which models and batch sizes to train, the optimizer and lr schedule, how
many epochs, and how large a synthetic dataset to draw. ``preset.train_kwargs(batch_size)``
gives the keyword arguments of :func:`featurescope.train.train`.

Example:
    >>> from featurescope.train.presets import get_preset
    >>> study = get_preset("study")
    >>> study.epochs, study.batch_sizes, study.lr_schedule
    (150, (8, 16), {1: 0.01, 19: 0.003})
    >>> study.train_kwargs(8)["optimizer"]
    'sgd'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from featurescope.errors import FeaturescopeError, UnknownNameError, did_you_mean
from featurescope.train._loop import STUDY_LR_SCHEDULE

__all__ = ["PRESETS", "QUICK", "STUDY", "Preset", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """A training recipe for the width comparison.

    Args:
        name: the preset's name (``--preset NAME``).
        description: one line on what it is for.
        models: zoo names to compare.
        batch_sizes: each model is trained once per batch size.
        epochs: epochs per run.
        lr_schedule: ``{first epoch: lr}``.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        momentum: SGD momentum.
        weight_decay: ``None`` for the optimizer's default.
        augment: train on :func:`~featurescope.data.train_transform` (random crop and flip)
            instead of the plain preprocessing.
        init: ``"kaiming"`` re-initialises new models with
            :func:`~featurescope.train.kaiming_init_`; ``None`` keeps the zoo's (PyTorch's
            default) initialisation, as the study did.
        channels_last: train channels-last (faster convolutions on CPUs and recent GPUs).
        dataset: keyword arguments of :func:`~featurescope.data.make_synthetic_dataset`.
    """

    name: str
    description: str
    models: tuple[str, ...] = ("alexnet", "alexnet_half")
    batch_sizes: tuple[int, ...] = (16,)
    epochs: int = 10
    lr_schedule: Mapping[int, float] = field(default_factory=lambda: dict(STUDY_LR_SCHEDULE))
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float | None = None
    augment: bool = False
    init: str | None = None
    channels_last: bool = False
    dataset: Mapping[str, int] = field(default_factory=dict)

    def build_model(
        self,
        name: str,
        num_classes: int | None = None,
        *,
        seed: int = 0,
        class_names: Sequence[str] | None = None,
    ) -> nn.Module:
        """Create zoo model ``name`` with this preset's initialisation, seeded by ``seed``.

        ``num_classes`` and ``class_names`` are passed to :func:`featurescope.create_model`.
        """
        from featurescope.train._loop import kaiming_init_
        from featurescope.zoo import create_model

        torch.manual_seed(seed)
        model = create_model(name, num_classes=num_classes, class_names=class_names)
        if self.init == "kaiming":
            kaiming_init_(model)
        elif self.init is not None:
            raise FeaturescopeError(f"unknown init {self.init!r}; use 'kaiming' or None")
        return model

    def train_kwargs(self, batch_size: int | None = None) -> dict[str, Any]:
        """Keyword arguments for :func:`featurescope.train.train` (not the model or data)."""
        return {
            "epochs": self.epochs,
            "batch_size": batch_size if batch_size is not None else self.batch_sizes[0],
            "lr_schedule": dict(self.lr_schedule),
            "optimizer": self.optimizer,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "channels_last": self.channels_last,
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, for ``metrics.json`` and reports."""
        return {
            "name": self.name,
            "description": self.description,
            "models": list(self.models),
            "batch_sizes": list(self.batch_sizes),
            "epochs": self.epochs,
            "lr_schedule": {str(k): v for k, v in self.lr_schedule.items()},
            "optimizer": self.optimizer,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "augment": self.augment,
            "init": self.init,
            "channels_last": self.channels_last,
            "dataset": dict(self.dataset),
        }


#: The study's own schedule, for a GPU: 150 epochs of SGD with momentum at batch sizes 8 and 16,
#: lr 0.01 for epochs 1-18 and 0.003 after.
STUDY = Preset(
    name="study",
    description="the study's full schedule: 150 epochs, SGD momentum 0.9, lr 0.01 then 0.003 "
    "from epoch 19, batch sizes 8 and 16 (hours on a CPU; use a GPU)",
    batch_sizes=(8, 16),
    epochs=150,
    lr_schedule=dict(STUDY_LR_SCHEDULE),
    optimizer="sgd",
    momentum=0.9,
    dataset={"train_per_class": 200, "val_per_class": 50, "test_per_class": 20, "size": 128},
)

#: The study's first experiment in small: both widths at both of the study's batch sizes, 8 and
#: 16, four runs. Each learns visibly (validation accuracy 0.64-0.76 after 4 epochs, chance
#: 0.2). Measured for the whole ``featurescope demo`` (four runs, maps, search, explorer): 488
#: CPU-seconds, 999 s of wall time while other jobs held the 2-core machine at load average
#: ~7.5. Epochs that ran while it was quiet took 5-9 s, which puts a quiet demo near 150 s (an
#: estimate from those epochs, not a measurement). The study's recipe cannot learn in
#: such a budget: with PyTorch's default init and no normalisation, AlexNet sits at chance for
#: many epochs under SGD at lr 0.01, and under Adam too for the hundred-odd steps a CPU affords.
#: So this preset differs from the study in three ways, each needed: He (Kaiming) init, Adam at
#: lr 3e-4, and 4 epochs of 200 images (not 150 epochs of 1000).
QUICK = Preset(
    name="quick",
    description="minutes on a CPU: He init, Adam lr 3e-4, 4 epochs at batch sizes 8 and 16 "
    "on 200 synthetic images",
    batch_sizes=(8, 16),
    epochs=4,
    lr_schedule={1: 3e-4},
    optimizer="adam",
    init="kaiming",
    channels_last=True,
    dataset={"train_per_class": 40, "val_per_class": 10, "test_per_class": 5, "size": 128},
)

#: Every preset by name.
PRESETS: dict[str, Preset] = {p.name: p for p in (QUICK, STUDY)}


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (see :data:`PRESETS`).

    Raises:
        UnknownNameError: no such preset; the message names the close ones.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown preset {name!r}; choose from {sorted(PRESETS)}." + did_you_mean(name, PRESETS)
        ) from None
