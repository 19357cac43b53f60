"""Which torchvision models the sweeps build, in which lane, and the switch that builds them all.

Three sweeps build every torchvision classifier: the tap's (``test_tap_sweep.py``), Grad-CAM's
default node (``test_gradcam_default.py``) and the receptive fields (``test_receptive_sweep.py``).
Each names a small ``subset`` that runs in the fast lane (``pytest -m "not slow"``) on every
torch; the other models are marked ``slow`` and run on the newest torch only, since node names
and graphs differ slightly between versions.

The largest models are left out unless ``FEATURESCOPE_FULL_SWEEPS=1``, as timm keeps its giant
models out of CI (``EXCLUDE_FILTERS`` in timm's ``tests/test_models.py``). Building and running
them (hundreds of millions of random parameters; ``regnet_y_128gf`` and ``vit_h_14`` alone hold
over 600 million) took most of the sweeps' time, and they add no op their smaller siblings lack:
the default sweep keeps at least one model of every architecture module of
``torchvision.models`` (``test_sweep_models.py`` checks it). The same variable runs the
receptive-field sweep, whose float64 gradients cost minutes per model even for the small ones.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence

import pytest
import torch
import torchvision

#: The environment variable that runs every sweep in full.
FULL_SWEEPS_VARIABLE = "FEATURESCOPE_FULL_SWEEPS"
#: The newest torch, the only one that runs the sweeps beyond their subsets.
NEWEST_TORCH = (2, 14)
#: Models the sweeps build only when ``FEATURESCOPE_FULL_SWEEPS=1`` (fnmatch patterns).
EXCLUDE_FILTERS = (
    "convnext_base",
    "convnext_large",
    "densenet161",
    "densenet201",
    "efficientnet_b[567]",
    "efficientnet_v2_[ml]",
    "regnet_[xy]_16gf",
    "regnet_[xy]_32gf",
    "regnet_y_128gf",
    "resnet152",
    "resnext101_*",
    "swin_b",
    "swin_v2_b",
    "vgg1[369]*",
    "vit_h_*",
    "vit_l_*",
    "wide_resnet101_2",
)


def full_sweeps() -> bool:
    """Whether ``FEATURESCOPE_FULL_SWEEPS=1`` asks for every model and every sweep."""
    return os.environ.get(FULL_SWEEPS_VARIABLE) == "1"


def is_excluded(name: str) -> bool:
    """Whether ``name`` matches one of :data:`EXCLUDE_FILTERS`."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in EXCLUDE_FILTERS)


def torchvision_classifiers() -> list[str]:
    """Every classification model of ``torchvision.models``, in torchvision's order."""
    return torchvision.models.list_models(module=torchvision.models)


def _newest_torch() -> bool:
    return tuple(int(p) for p in torch.__version__.split(".")[:2]) >= NEWEST_TORCH


def marks(name: str, subset: Sequence[str]) -> tuple[pytest.MarkDecorator, ...]:
    """The marks of one sweep's case for ``name``: fast lane, slow lane, or left out (and why)."""
    if name in subset:
        return ()
    slow = pytest.mark.slow
    if not _newest_torch():
        return (slow, pytest.mark.skip(reason="the full sweep runs on the newest torch only"))
    if is_excluded(name) and not full_sweeps():
        reason = f"one of the largest models: {FULL_SWEEPS_VARIABLE}=1 builds it (tests/_sweep.py)"
        return (slow, pytest.mark.skip(reason=reason))
    return (slow,)


def params(names: Sequence[str], subset: Sequence[str]) -> list[pytest.param]:
    """One ``pytest.param`` per model name, marked by :func:`marks`."""
    return [pytest.param(n, marks=marks(n, subset)) for n in names]
