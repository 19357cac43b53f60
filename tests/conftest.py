"""Shared fixtures and the lanes. Installed third-party plugins are never loaded during tests.

Two lanes: ``pytest -m "not slow"`` (the fast lane, what the older torch environments run) and
``pytest`` (everything, the newest torch's environment). Besides the tests marked ``slow`` where
they are written, :func:`pytest_collection_modifyitems` marks slow, in one place, whatever
starts ``torch.distributed`` processes (the ``distributed`` marker) and whatever runs the whole
demo (the ``demo_out`` fixture).
"""

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


#: Fixtures whose tests are slow wherever they are used: the demo, end to end, on tiny data.
SLOW_FIXTURES = frozenset({"demo_out"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("distributed") or fixtures & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if fixtures & SLOW_FIXTURES:
            # The first of a module's demo tests runs the whole demo in its setup.
            item.add_marker(pytest.mark.timeout(900))


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


@pytest.fixture
def one_thread():
    """Run the test on one torch thread, then restore the caller's count.

    Many small ops on a busy 2-core machine: two OpenMP threads spin against each other and run
    such forwards a hundred times slower than one.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_preset():
    from featurescope.train.presets import Preset

    return Preset(
        "tiny",
        "a test preset: one epoch of each width",
        batch_sizes=(5,),
        epochs=1,
        optimizer="adam",
        lr_schedule={1: 1e-4},
        dataset={"train_per_class": 2, "val_per_class": 1, "test_per_class": 1, "size": 32},
    )


@pytest.fixture(scope="session")
def tiny_preset():
    """A preset that trains both widths for one epoch on a few 32-pixel images."""
    return _tiny_preset()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_preset):
    """The synthetic dataset of :func:`tiny_preset`, drawn once per session (per worker)."""
    from featurescope.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny", **tiny_preset.dataset)


@pytest.fixture(scope="session")
def search_data(tmp_path_factory):
    """A small synthetic image folder (train/ and test/) for search by image."""
    from featurescope.data import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("search") / "data",
        train_per_class=4,
        val_per_class=0,
        test_per_class=1,
        size=40,
    )


@pytest.fixture(scope="session")
def image_search(search_data):
    """An :class:`~featurescope.ImageSearch` of :func:`search_data` by a random half AlexNet."""
    import featurescope as fs

    return fs.ImageSearch.build(fs.create_model("alexnet_half"), search_data, progress=False)
