"""Sphinx helpers for featurescope's docs: pages generated from the code, at build time.

Directives:

``.. featurescope-cli::``
    The CLI reference: one section per subcommand of ``featurescope.cli.build_parser()`` with
    its ``--help``, so the page cannot drift from the parser (no sphinx-argparse needed).
``.. featurescope-markdown:: PATH``
    A Markdown file (headings, paragraphs, lists, pipe tables, fenced code) rendered as docutils
    nodes, for the tables the benchmark scripts write to ``benchmarks/README_*.md``. A missing
    file renders the directive's content instead (``:optional:`` flag).
``.. featurescope-benchmark-scripts::``
    A list of the scripts in ``benchmarks/`` with the first line of each one's docstring.

And two checks run when the build starts (warnings, so ``-W`` fails the build): every name in
``featurescope.__all__`` is listed in ``api.rst``, and every hook in ``featurescope.hookspecs``
has a section titled with its name in ``plugins.rst``.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
from pathlib import Path
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
HELP_WIDTH = 88


# -- CLI reference ---------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` of each subcommand, in the order they were added."""
    result = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                result.append((name, helps.get(name, ""), sub))
    return result


def _help_text(parser: argparse.ArgumentParser) -> str:
    formatter_class = parser.formatter_class
    parser.formatter_class = lambda prog: formatter_class(prog, width=HELP_WIDTH)  # type: ignore[misc]
    if hasattr(parser, "color"):  # Python >= 3.14 colours help on terminals
        parser.color = False
    try:
        return parser.format_help().rstrip()
    finally:
        parser.formatter_class = formatter_class


class CliDirective(SphinxDirective):
    """Renders ``featurescope --help`` and every subcommand's ``--help``."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from featurescope.cli import build_parser

        parser = build_parser()
        self.env.note_dependency(str(ROOT / "src" / "featurescope" / "cli" / "__init__.py"))
        result: list[nodes.Node] = [nodes.literal_block(text=_help_text(parser), language="text")]
        result += self._sections(parser, [parser.prog])
        return result

    def _sections(self, parser: argparse.ArgumentParser, path: list[str]) -> list[nodes.Node]:
        sections: list[nodes.Node] = []
        for name, short, sub in _subcommands(parser):
            words = [*path, name]
            title = " ".join(words)
            section = nodes.section(ids=[nodes.make_id("cli " + title)])
            section["names"].append(nodes.fully_normalize_name(title))
            section += nodes.title(text=title)
            if short:
                section += nodes.paragraph(text=short[0].upper() + short[1:] + ".")
            section += nodes.literal_block(text=_help_text(sub), language="text")
            for child in self._sections(sub, words):
                section += child
            self.state.document.note_implicit_target(section, section)
            sections.append(section)
        return sections


# -- Markdown (benchmark tables) -------------------------------------------------------------

_INLINE = re.compile(
    r"`(?P<code>[^`]+)`"
    r"|\*\*(?P<strong>[^*]+)\*\*"
    r"|(?<![\w*])\*(?P<em>[^*\s][^*]*)\*(?![\w*])"
    r"|\[(?P<text>[^\]]+)\]\((?P<url>[^)\s]+)\)"
)


def _inline(text: str) -> list[nodes.Node]:
    """Docutils nodes for one line of Markdown inline markup; nothing is parsed as reST."""
    out: list[nodes.Node] = []
    pos = 0
    for m in _INLINE.finditer(text):
        if m.start() > pos:
            out.append(nodes.Text(text[pos : m.start()]))
        if m.group("code") is not None:
            out.append(nodes.literal(text=m.group("code")))
        elif m.group("strong") is not None:
            out.append(nodes.strong(text=m.group("strong")))
        elif m.group("em") is not None:
            out.append(nodes.emphasis(text=m.group("em")))
        else:
            url = m.group("url")
            if re.match(r"https?://", url):
                out.append(nodes.reference(text=m.group("text"), refuri=url))
            else:  # a repository-relative link means nothing on the docs site
                out.append(nodes.Text(m.group("text")))
        pos = m.end()
    if pos < len(text):
        out.append(nodes.Text(text[pos:]))
    return out


def _row(line: str) -> list[str]:
    cells = line.strip().strip("|").split("|")
    return [c.strip() for c in cells]


def _table(lines: list[str]) -> nodes.table:
    header = _row(lines[0])
    body = [_row(line) for line in lines[2:]]
    ncols = max(len(header), *(len(r) for r in body)) if body else len(header)
    table = nodes.table(classes=["featurescope-md-table"])
    group = nodes.tgroup(cols=ncols)
    table += group
    for _ in range(ncols):
        group += nodes.colspec(colwidth=1)

    def make_row(cells: list[str]) -> nodes.row:
        row = nodes.row()
        for i in range(ncols):
            entry = nodes.entry()
            entry += nodes.paragraph("", "", *_inline(cells[i] if i < len(cells) else ""))
            row += entry
        return row

    thead = nodes.thead()
    thead += make_row(header)
    group += thead
    tbody = nodes.tbody()
    for cells in body:
        tbody += make_row(cells)
    group += tbody
    return table


def markdown_to_nodes(text: str) -> list[nodes.Node]:
    """Headings (as rubrics), paragraphs, lists, pipe tables and code blocks of ``text``."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    lines = text.splitlines()
    out: list[nodes.Node] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            i += 1
        elif stripped.startswith("```"):
            language = stripped[3:].strip() or "text"
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            code = "\n".join(lines[i + 1 : j])
            out.append(nodes.literal_block(text=code, language=_language(language)))
            i = j + 1
        elif stripped.startswith("#"):
            out.append(nodes.rubric("", "", *_inline(stripped.lstrip("#").strip())))
            i += 1
        elif (
            stripped.startswith("|")
            and i + 1 < len(lines)
            and re.fullmatch(r"\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?", lines[i + 1].strip())
        ):
            j = i + 2
            while j < len(lines) and lines[j].strip().startswith("|"):
                j += 1
            out.append(_table([ln for ln in lines[i:j]]))
            i = j
        elif re.match(r"([-*+]|\d+[.)])\s+", stripped):
            ordered = bool(re.match(r"\d", stripped))
            lst = nodes.enumerated_list() if ordered else nodes.bullet_list()
            while i < len(lines) and re.match(r"\s*([-*+]|\d+[.)])\s+", lines[i]):
                item_text = re.sub(r"^\s*([-*+]|\d+[.)])\s+", "", lines[i])
                i += 1
                while (
                    i < len(lines)
                    and lines[i].startswith((" ", "\t"))
                    and lines[i].strip()
                    and not re.match(r"\s*([-*+]|\d+[.)])\s+", lines[i])
                ):
                    item_text += " " + lines[i].strip()
                    i += 1
                item = nodes.list_item()
                item += nodes.paragraph("", "", *_inline(item_text))
                lst += item
            out.append(lst)
        elif line.startswith("    "):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            code = "\n".join(ln[4:] for ln in lines[i:j]).rstrip()
            out.append(nodes.literal_block(text=code, language="text"))
            i = j
        else:
            para = [stripped]
            i += 1
            while i < len(lines) and lines[i].strip() and not _starts_block(lines, i):
                para.append(lines[i].strip())
                i += 1
            out.append(nodes.paragraph("", "", *_inline(" ".join(para))))
    return out


def _starts_block(lines: list[str], i: int) -> bool:
    s = lines[i].strip()
    return s.startswith(("```", "#", "|")) or bool(re.match(r"([-*+]|\d+[.)])\s+", s))


def _language(name: str) -> str:
    aliases = {"sh": "bash", "shell": "bash", "console": "console", "py": "python"}
    name = aliases.get(name, name)
    from pygments.lexers import get_lexer_by_name
    from pygments.util import ClassNotFound

    try:
        get_lexer_by_name(name)
    except ClassNotFound:
        return "text"
    return name


class MarkdownDirective(SphinxDirective):
    """Renders a Markdown file; when it is missing, renders the directive's content."""

    required_arguments = 1
    has_content = True
    option_spec: ClassVar[dict[str, Any]] = {"optional": directives.flag}

    def run(self) -> list[nodes.Node]:
        rel, path = self.env.relfn2path(self.arguments[0])
        source = Path(path)
        if not source.is_file():
            if "optional" not in self.options:
                return [
                    self.state.document.reporter.warning(f"{source} not found", line=self.lineno)
                ]
            container = nodes.container()
            self.state.nested_parse(self.content, self.content_offset, container)
            return container.children
        self.env.note_dependency(rel)
        return markdown_to_nodes(source.read_text(encoding="utf-8"))


class BenchmarkScriptsDirective(SphinxDirective):
    """A bullet list: ``python benchmarks/NAME.py``, then its docstring's first line."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        scripts = sorted((ROOT / "benchmarks").glob("*.py"))
        scripts = [s for s in scripts if not s.name.startswith("_")]
        if not scripts:
            return [nodes.paragraph(text="No benchmark scripts yet.")]
        lst = nodes.bullet_list()
        for script in scripts:
            self.env.note_dependency(str(script))
            doc = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
            first = doc.strip().splitlines()[0] if doc.strip() else ""
            para = nodes.paragraph()
            para += nodes.literal(text=f"python benchmarks/{script.name}")
            if first:
                para += nodes.Text(": ")
                para += _inline(first)
            item = nodes.list_item()
            item += para
            lst += item
        return [lst]


# -- Completeness checks ---------------------------------------------------------------------


def _check_api_listed(app: Sphinx) -> None:
    import featurescope

    api = Path(app.srcdir) / "api.rst"
    text = api.read_text(encoding="utf-8")
    listed = set(re.findall(r"^\s{3,}~?(?:featurescope\.)?([\w.]+)\s*$", text, flags=re.M))
    for name in featurescope.__all__:
        if name not in listed:
            logger.warning(
                "featurescope.%s is public (in featurescope.__all__) but not listed in "
                "docs/api.rst; add it to the autosummary of the section it belongs to",
                name,
                location="api",
            )


def _check_hooks_documented(app: Sphinx) -> None:
    from featurescope import hookspecs

    page = Path(app.srcdir) / "plugins.rst"
    text = page.read_text(encoding="utf-8")
    titles = set(re.findall(r"^(\S[^\n]*)\n[-~^\"'=]{3,}\s*$", text, flags=re.M))
    for name in vars(hookspecs):
        if name.startswith("featurescope_") and name not in titles:
            logger.warning(
                "hook %s (featurescope/hookspecs.py) has no section titled with its name in "
                "docs/plugins.rst's Hooks reference",
                name,
                location="plugins",
            )


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


def _checks(app: Sphinx) -> None:
    _check_api_listed(app)
    _check_hooks_documented(app)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("featurescope-cli", CliDirective)
    app.add_directive("featurescope-markdown", MarkdownDirective)
    app.add_directive("featurescope-benchmark-scripts", BenchmarkScriptsDirective)
    app.connect("builder-inited", _checks)
    app.connect("autodoc-process-docstring", _data_docstring, priority=900)  # after napoleon
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


__all__ = ["markdown_to_nodes", "setup"]
