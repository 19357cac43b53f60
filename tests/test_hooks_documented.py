"""Every hook in featurescope.hookspecs has a test and a section in the docs (as datasette does).

A hook's test is a function named ``test_hook_<name>`` anywhere under ``tests/``, where
``<name>`` is the hook's name with or without the ``featurescope_`` prefix
(``test_hook_register_models``). Its documentation is a section of an ``.rst`` file under
``docs/`` whose title contains the hook's full name, e.g.::

    featurescope_register_models()
    ------------------------------

or an ``.. autofunction:: featurescope.hookspecs.<hook>`` directive.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from featurescope import hookspecs

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
DOCS = ROOT / "docs"
PREFIX = "featurescope_"

HOOKS = sorted(
    name
    for name, value in vars(hookspecs).items()
    if name.startswith(PREFIX) and hasattr(value, f"{PREFIX}spec")
)

_UNDERLINE = re.compile(r"""^([=\-~^"'`#*+:.])\1*\s*$""")


def hooks_with_tests(sources: list[str]) -> set[str]:
    """The hooks that one of the test sources defines a ``test_hook_<name>`` function for."""
    found = set()
    for hook in HOOKS:
        short = hook.removeprefix(PREFIX)
        pattern = re.compile(rf"^\s*def test_hook_(?:{PREFIX})?{short}\b", re.MULTILINE)
        if any(pattern.search(source) for source in sources):
            found.add(hook)
    return found


def documented_hooks(rst: str) -> set[str]:
    """The hooks that an rst text gives a section (a titled heading or an autofunction)."""
    lines = rst.splitlines()
    titles = [
        line
        for line, below in itertools.pairwise(lines)
        if line.strip() and _UNDERLINE.match(below) and len(below.rstrip()) >= len(line.rstrip())
    ]
    found = set()
    for hook in HOOKS:
        autodoc = re.compile(rf"^\.\. autofunction:: featurescope\.hookspecs\.{hook}\s*$", re.M)
        if any(re.search(rf"\b{hook}\b", title) for title in titles) or autodoc.search(rst):
            found.add(hook)
    return found


def test_there_are_hooks():
    assert {
        "featurescope_register_models",
        "featurescope_register_visualizers",
        "featurescope_features_extracted",
    } <= set(HOOKS)


def test_the_checks_can_fail():
    assert hooks_with_tests(["def test_hook_other(): pass"]) == set()
    assert hooks_with_tests(["def test_hook_register_models_extra(): pass"]) == set()
    assert hooks_with_tests(["def test_hook_register_models(): pass"]) == {
        "featurescope_register_models"
    }
    assert documented_hooks("Mentions featurescope_register_models in passing.\n") == set()
    assert documented_hooks("featurescope_register_models()\n---\n") == set()  # short underline
    assert documented_hooks("featurescope_register_models()\n------------------------------\n") == {
        "featurescope_register_models"
    }
    assert documented_hooks(
        ".. autofunction:: featurescope.hookspecs.featurescope_features_extracted\n"
    ) == {"featurescope_features_extracted"}


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hook_has_a_test(hook):
    sources = [path.read_text() for path in TESTS.rglob("*.py")]
    assert hook in hooks_with_tests(sources), (
        f"hook {hook} has no test: add a function named test_hook_{hook.removeprefix(PREFIX)} "
        "under tests/"
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hook_is_documented(hook):
    pages = sorted(DOCS.rglob("*.rst")) if DOCS.is_dir() else []
    pages = [p for p in pages if "_build" not in p.parts]
    if not pages:
        pytest.skip("docs/ has no .rst files yet; every hook will need a section there")
    documented = set().union(*(documented_hooks(page.read_text()) for page in pages))
    assert hook in documented, (
        f"hook {hook} has no section in docs/*.rst: add a heading that names it (e.g. in "
        f"docs/plugins.rst) or '.. autofunction:: featurescope.hookspecs.{hook}'"
    )
