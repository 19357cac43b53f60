"""The docs stay true to the code: every public name documented, every snippet valid Python.

Cheap checks that need no Sphinx (the docs build itself runs in tox's ``docs`` environment).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import featurescope

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.glob("*.rst"))

PUBLIC = sorted(featurescope.__all__)
# Classes and functions carry their own docstring; values (__version__, hookimpl, ...) are
# documented by a ``#:`` comment where they are assigned and listed in the API reference.
DOCUMENTED_OBJECTS = [
    name
    for name in PUBLIC
    if inspect.isclass(getattr(featurescope, name))
    or inspect.isroutine(getattr(featurescope, name))
]

_EXAMPLE = re.compile(r"^\s*Examples?:\s*$", re.MULTILINE)
_CODE_BLOCK = re.compile(r"^( *)\.\. code-block:: python\n((?:\1   .*\n|\s*\n)+)", re.MULTILINE)


def python_blocks(rst: str) -> list[str]:
    """The bodies of the ``.. code-block:: python`` directives of an rst text, dedented."""
    blocks = []
    for match in _CODE_BLOCK.finditer(rst):
        lines = match.group(2).splitlines()
        body = [line for line in lines if not line.strip().startswith(":")]
        blocks.append(inspect.cleandoc("\n".join(body)))
    return blocks


def api_listed(rst: str) -> set[str]:
    """Names listed in the autosummary tables of an rst text."""
    return set(re.findall(r"^ {3,}~?(?:featurescope\.)?([\w.]+)\s*$", rst, flags=re.MULTILINE))


def test_the_checks_can_fail():
    assert not _EXAMPLE.search('"""Do a thing.\n\n    Args:\n        x: y\n"""')
    assert _EXAMPLE.search('"""Do a thing.\n\n    Example:\n        >>> 1\n"""')
    page = "Intro\n\n.. code-block:: python\n\n   x = (\n\nText.\n"
    with pytest.raises(SyntaxError):
        ast.parse(python_blocks(page)[0])
    assert api_listed(".. autosummary::\n\n   create_model\n   FeatureTap\n") == {
        "create_model",
        "FeatureTap",
    }


def test_docs_have_pages():
    names = {p.stem for p in PAGES}
    assert {"index", "api", "plugins", "cli", "tap", "index_guide", "zoo", "tutorial"} <= names


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_is_in_the_api_reference(name):
    assert name in api_listed((DOCS / "api.rst").read_text(encoding="utf-8")), (
        f"featurescope.{name} is public but not in docs/api.rst; add it to the autosummary of "
        "the section it belongs to"
    )


@pytest.mark.parametrize("name", DOCUMENTED_OBJECTS)
def test_public_name_has_a_docstring_with_an_example(name):
    doc = getattr(featurescope, name).__doc__
    assert doc and doc.strip(), f"featurescope.{name} has no docstring"
    assert _EXAMPLE.search(doc), (
        f"featurescope.{name}'s docstring has no 'Example:' section; add one with a >>> "
        "doctest that runs"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_snippets_parse(page):
    for i, block in enumerate(python_blocks(page.read_text(encoding="utf-8"))):
        try:
            ast.parse(block)
        except SyntaxError as exc:
            pytest.fail(f"{page.name}, python block {i + 1}: {exc}\n{block}")
