"""Sphinx helpers for featurescope's docs that no ecosystem tool provides.

``.. featurescope-benchmark-scripts::``
    A list of the scripts in ``benchmarks/`` with the first line of each one's docstring.

And the ``#:`` comment of a module-level value as its documentation (see
:func:`_data_docstring`). The Markdown benchmark tables are included with MyST-Parser, the CLI
reference is sphinx-argparse-cli's and the docs' checks are tests (``tests/test_docs.py``,
``tests/test_hooks_documented.py``), so each exists once.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parents[2]


class BenchmarkScriptsDirective(SphinxDirective):
    """A bullet list: ``python benchmarks/NAME.py``, then its docstring's first line."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        scripts = sorted((ROOT / "benchmarks").glob("*.py"))
        scripts = [s for s in scripts if not s.name.startswith("_")]
        if not scripts:
            return [nodes.paragraph(text="No benchmark scripts yet.")]
        lines = StringList()
        for script in scripts:
            self.env.note_dependency(str(script))
            doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
            first = doc.strip().splitlines()[0] if doc.strip() else ""
            item = f"* ``python benchmarks/{script.name}``" + (f": {first}" if first else "")
            lines.append(item, str(script))
        container = nodes.container()
        self.state.nested_parse(lines, self.content_offset, container)
        return container.children


# -- Module-level values ----------------------------------------------------------------


_DATA_DOCS = {
    "featurescope.__version__": "The installed featurescope's version, e.g. ``'0.1.0'``.",
}


def _comment_doc(name: str) -> list[str] | None:
    """The ``#:`` comment documenting ``name`` where a featurescope module assigns it."""
    import sys

    from sphinx.pycode import ModuleAnalyzer, PycodeError

    attr = name.rsplit(".", 1)[-1]
    modules = sorted(m for m in sys.modules if m == "featurescope" or m.startswith("featurescope."))
    for modname in modules:
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except PycodeError:
            continue
        if ("", attr) in docs:
            return list(docs[("", attr)])
    return None


def _data_docstring(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Document a module-level value with its ``#:`` comment, not the docstring of its type.

    autodoc only finds ``#:`` comments in the module it documents (``featurescope``), where
    these values are only imported, so it falls back to ``type(value).__doc__``: ``__version__``
    would be documented with the docstring of ``str``. Runs after napoleon, which would read a
    comment such as ``The study's preprocessing: Resize 256 ...`` as ``type: description``.
    """
    if what != "data" or inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj):
        return
    comment = _comment_doc(name)
    if comment:
        lines[:] = comment
    elif name in _DATA_DOCS:
        lines[:] = [_DATA_DOCS[name], ""]
    else:
        lines[:] = []


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("featurescope-benchmark-scripts", BenchmarkScriptsDirective)
    app.connect("autodoc-process-docstring", _data_docstring, priority=900)  # after napoleon
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


__all__ = ["setup"]
