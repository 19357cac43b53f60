"""Shared fixtures. Installed third-party plugins are never loaded during tests."""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

# datasette's convention: featurescope.plugins skips entry points while this is set.
sys._called_from_test = True  # type: ignore[attr-defined]

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)


@pytest.fixture
def fresh_plugins():
    """Start from a newly built plugin manager and leave none behind.

    Test modules that register plugins use it for every test:
    ``pytestmark = pytest.mark.usefixtures("fresh_plugins")``.
    """
    from featurescope import plugins

    plugins._reset()
    yield
    plugins._reset()
