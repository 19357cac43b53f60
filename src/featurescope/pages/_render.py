"""Pages from package templates: the explorer, the units page and the report, one stylesheet.

Templates are Jinja2, autoescaped; the data a page's script draws travels as inert JSON in
``<script id="fs-data" type="application/json">`` and the script itself is allowed by its hash
in the page's Content-Security-Policy, so a page works from ``file://`` with no inline script
but its own.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from collections.abc import Mapping
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

__all__ = [
    "inert_json",
    "parse",
    "render",
    "render_explorer",
    "render_units_page",
    "script_hash",
    "stylesheet",
    "stylesheet_path",
]

_STATIC = "static"


def stylesheet_path() -> Path:
    """Where featurescope's one stylesheet is: the file the pages inline and the app serves.

    Example:
        >>> stylesheet_path().name
        'featurescope.css'
    """
    return Path(
        str(resources.files("featurescope.pages").joinpath(_STATIC).joinpath("featurescope.css"))
    )


def stylesheet() -> str:
    """The text of featurescope's one stylesheet (shared by every page and the app).

    Example:
        >>> ".fs-chan" in stylesheet()
        True
    """
    return stylesheet_path().read_text(encoding="utf-8")


def _script() -> str:
    return (
        resources.files("featurescope.pages")
        .joinpath(_STATIC)
        .joinpath("explorer.js")
        .read_text(encoding="utf-8")
    )


@functools.cache
def _environment() -> jinja2.Environment:
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("featurescope.pages", "templates"),
        autoescape=True,  # every template is HTML
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["cell"] = cell
    return environment


def cell(value: Any) -> str:
    """A table cell's text: a dash for nothing, three decimals for a float.

    Example:
        >>> cell(None), cell(0.12345), cell(7), cell(float("nan"))
        ('–', '0.123', '7', 'nan')
    """
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def render(template: str, **context: Any) -> str:
    """Render the package template ``template`` (autoescaped) with ``context``; every template
    gets ``stylesheet``, the shared CSS.

    Example:
        >>> page = render("report.html", title="<b>", sections=[], version="0")
        >>> "<title>&lt;b&gt;</title>" in page
        True
    """
    from markupsafe import Markup

    return _environment().get_template(template).render(stylesheet=Markup(stylesheet()), **context)


def _with_script(template: str, data: Mapping[str, Any], **context: Any) -> str:
    from markupsafe import Markup

    script = _script()
    return render(
        template,
        title=data["title"],
        data=data,
        # Already safe inside <script>: inert_json escapes every <, > and &.
        payload=Markup(inert_json(data)),
        script=Markup(script),
        script_hash=script_hash(script),
        **context,
    )


def render_explorer(data: Mapping[str, Any]) -> str:
    """The explorer page of ``data`` (:class:`~featurescope.pages.ExplorerData`), one file
    that works offline."""
    metrics = data["metrics"]
    columns = list(dict.fromkeys(c for row in metrics.values() for c in row if c != "num_queries"))
    return _with_script(
        "explorer.html",
        data,
        search_note=_search_note(data),
        metric_rows=[{"": name, **row} for name, row in metrics.items()],
        metric_columns=[("", ""), *((c, c) for c in columns)],
    )


def render_units_page(data: Mapping[str, Any]) -> str:
    """A page of units alone: ``data`` holds ``title``, ``version``, ``model``,
    ``weights_sentence``, ``images`` and ``units`` (:class:`~featurescope.pages.Units`)."""
    return _with_script("units.html", data)


def _search_note(data: Mapping[str, Any]) -> str:
    words, k = data["wording"], data["k"]
    labelled = any(q["label"] >= 0 for q in data["queries"])
    marks = ", framed green where the class matches (a hit) and red where not" if labelled else ""
    self_note = (
        " A query that is itself in the gallery is left out of its own neighbours."
        if data["exclude_self"] and any(q.get("id") is not None for q in data["queries"])
        else ""
    )
    return (
        f"Click {words['a_query']}: its {k} nearest {words['gallery']}, nearest first"
        f"{marks}.{self_note}"
    )


#: What may not appear raw in a page's inline JSON: markup characters (a name such as
#: ``<!--<script>.png`` would otherwise change how the HTML parser reads the script element),
#: JavaScript's line separators, and lone surrogates (file names that are not UTF-8).
_UNSAFE_IN_SCRIPT = re.compile("[<>&\u2028\u2029\ud800-\udfff]")


def inert_json(data: Any) -> str:
    """``data`` as JSON that no value can break out of inside ``<script>``: every ``<``, ``>``,
    ``&``, U+2028, U+2029 and lone surrogate is written as a ``\\uXXXX`` escape.

    Example:
        >>> inert_json({"name": "<!--<script>&.png"})
        '{"name":"\\\\u003c!--\\\\u003cscript\\\\u003e\\\\u0026.png"}'
        >>> json.loads(inert_json({"name": "<!--<script>&.png"}))["name"]
        '<!--<script>&.png'
    """
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return _UNSAFE_IN_SCRIPT.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def script_hash(script: str) -> str:
    """The CSP source that allows exactly this inline script and no other: ``'sha256-...'``."""
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


class _DataScript(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inside = False
        self.found: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script" and ("id", "fs-data") in attrs:
            self.inside, self.found = True, []

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.inside = False

    def handle_data(self, data: str) -> None:
        if self.inside and self.found is not None:
            self.found.append(data)


def parse(text: str) -> dict[str, Any]:
    """The JSON data of an explorer page's ``<script id="fs-data">``; ``{}`` if it has none."""
    parser = _DataScript()
    parser.feed(text)
    parser.close()
    if parser.found is None:
        return {}
    data: dict[str, Any] = json.loads("".join(parser.found))
    return data
