"""The sweeps' default set loses no architecture: what ``tests/_sweep.py`` leaves out is opt-in."""

from __future__ import annotations

import fnmatch

import pytest
import torchvision

import _sweep as sweep


def _architecture(name: str) -> str:
    """The ``torchvision.models`` module that defines ``name`` (``resnet``, ``regnet``, ...)."""
    return torchvision.models.get_model_builder(name).__module__


def test_every_architecture_keeps_a_model_in_the_default_sweep() -> None:
    names = sweep.torchvision_classifiers()
    every = {_architecture(n) for n in names}
    kept = {_architecture(n) for n in names if not sweep.is_excluded(n)}
    assert every - kept == set(), "EXCLUDE_FILTERS leaves out every model of these architectures"
    assert len(every) >= 15, every  # the check means something only over many architectures


@pytest.mark.parametrize("pattern", sweep.EXCLUDE_FILTERS)
def test_each_filter_names_a_model_torchvision_has(pattern: str) -> None:
    # A misspelt pattern would leave its models in every run without a word.
    assert fnmatch.filter(sweep.torchvision_classifiers(), pattern), f"{pattern} matches no model"


def test_excluded_models_are_skipped_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sweep.FULL_SWEEPS_VARIABLE, raising=False)
    heavy, light, subset = "regnet_y_128gf", "resnet34", ("resnet18",)
    assert sweep.is_excluded(heavy) and not sweep.is_excluded(light)
    assert sweep.marks("resnet18", subset) == ()
    newest = sweep._newest_torch()
    names = lambda marks: [m.name for m in marks]  # noqa: E731
    assert names(sweep.marks(light, subset)) == (["slow"] if newest else ["slow", "skip"])
    assert names(sweep.marks(heavy, subset)) == ["slow", "skip"]
    monkeypatch.setenv(sweep.FULL_SWEEPS_VARIABLE, "1")
    assert names(sweep.marks(heavy, subset)) == (["slow"] if newest else ["slow", "skip"])
