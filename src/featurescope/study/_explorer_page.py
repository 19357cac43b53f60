"""The explorer's HTML: the page around its JSON data and ``explorer.js``, and reading it back."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
from collections.abc import Mapping
from html.parser import HTMLParser
from importlib import resources
from typing import Any

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em;
       color: #222; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
.fs-row { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.fs-note { color: #666; font-size: .9em; margin: .3em 0; }
.fs-warn { color: #8a4b00; background: #fff6e5; border-left: 4px solid #e69500;
           padding: .3em .6em; }
.fs-legend { display: flex; flex-wrap: wrap; gap: .4em; margin: .4em 0; }
.fs-run { border: 1px solid #ccc; background: #fff; border-radius: 4px; padding: .2em .5em;
          cursor: pointer; font: inherit; }
.fs-run.fs-off { opacity: .35; text-decoration: line-through; }
.fs-swatch { display: inline-block; width: .8em; height: .8em; margin-right: .35em;
             border-radius: 2px; vertical-align: middle; }
.fs-cka { border-collapse: collapse; font-size: 13px; }
.fs-cka td { padding: 4px 8px; text-align: center; font-variant-numeric: tabular-nums; }
.fs-cka th { font-weight: normal; padding: 2px 6px; }
.fs-chart .fs-grid { stroke: #eee; } .fs-tick { font-size: 10px; fill: #555; }
.fs-title { font-size: 12px; font-weight: 600; } .fs-dot { cursor: default; }
#fs-channels { display: flex; flex-wrap: wrap; gap: 2px; max-height: 9.5em; overflow-y: auto;
               max-width: 560px; }
.fs-chan { font: 11px monospace; padding: 1px 3px; border: 1px solid #ccc; background: #fafafa;
           cursor: pointer; min-width: 2.4em; }
.fs-chan.fs-selected, .fs-query.fs-selected { outline: 3px solid #1f77b4; }
canvas { border: 1px solid #ddd; image-rendering: auto; }
figure { margin: 0; } figcaption { font-size: 11px; text-align: center; max-width: 78px;
                                   overflow-wrap: anywhere; }
#fs-queries { display: flex; flex-wrap: wrap; gap: 4px; }
.fs-query { width: 64px; height: 64px; cursor: pointer; border: 1px solid #ccc;
            object-fit: cover; }
.fs-tiles { display: flex; flex-wrap: wrap; gap: 6px; }
.fs-tile img, .fs-tile .fs-missing { width: 72px; height: 72px; display: block;
                                     border: 3px solid transparent; }
.fs-missing { background: #eee; color: #777; font-size: 10px; text-align: center;
              line-height: 72px; }
.fs-hit img { border-color: #2ca02c; } .fs-miss img { border-color: #d62728; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: .25em .6em;
text-align: right; } th:first-child, td:first-child { text-align: left; }
.fs-scatter circle { cursor: pointer; stroke: #fff; stroke-width: .8; }
.fs-scatter circle.fs-picked { stroke: #000; stroke-width: 2.5; }
"""

_METRIC_NAMES = {
    "precision_at_1": "precision@1",
    "precision_at_k": "precision@k",
    "recall_at_k": "recall@k",
    "r_precision": "R-precision",
    "mean_average_precision_at_r": "mAP@R",
}


def metric_rows(metrics: Mapping[str, Mapping[str, float]] | None) -> dict[str, dict[str, float]]:
    """``{row: {display name: value}}`` of retrieval scores, named as the page shows them."""
    return {
        row: {_METRIC_NAMES.get(key, key): value for key, value in values.items()}
        for row, values in (metrics or {}).items()
    }


def _metrics_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    if not metrics:
        return "<p class='fs-note'>No classes on the queries: no precision to score.</p>"
    columns = list(dict.fromkeys(c for row in metrics.values() for c in row if c != "num_queries"))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{row.get(c, float('nan')):.3f}</td>" for c in columns)
        + "</tr>"
        for name, row in metrics.items()
    )
    return f"<table id='fs-metrics'><tr><th></th>{head}</tr>{body}</table>"


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


def _gradcam_block(data: Mapping[str, Any]) -> str:
    if any(q.get("cam") for q in data["queries"]):
        size = data["display_size"]
        return (
            "<h3>Grad-CAM of the predicted class</h3>"
            f"<canvas id='fs-gradcam' width='{size}' height='{size}'></canvas>"
            "<p id='fs-gradcam-caption' class='fs-note'></p>"
        )
    return f"<p id='fs-no-gradcam' class='fs-note'>{html.escape(data['no_cam_reason'])}</p>"


def _maps_block(data: Mapping[str, Any]) -> str:
    if not data["stages"]:
        return ""
    size = data["display_size"]
    canvases = "".join(
        f"<figure><canvas id='fs-map-{name}' width='{size}' height='{size}'></canvas>"
        f"<figcaption style='max-width:none'>{caption}</figcaption></figure>"
        for name, caption in (
            ("channel", "the channel"),
            ("sum", "summed over channels"),
            ("overlay", "the sum over the input"),
        )
    )
    noun = html.escape(data["wording"]["query"].capitalize())
    return (
        f"<h2>Feature maps</h2><div id='fs-maps'><p>{noun} <select id='fs-map-image'>"
        "</select> stage <select id='fs-stage'></select></p><p class='fs-note'>Channels, "
        "strongest mean activation first:</p><div id='fs-channels'></div>"
        f"<div class='fs-row'>{canvases}</div><p id='fs-map-caption' class='fs-note'></p></div>"
    )


def _similarity_block(data: dict[str, Any]) -> str:
    if not data.get("similarity"):
        return ""
    return (
        "<h2>Do the two widths learn the same thing?</h2><p class='fs-note'>Linear CKA between "
        "every pair of nodes (1: the same representation up to rotation and scale). Hover a cell "
        "for its value and estimator.</p><div id='fs-similarity' class='fs-row'></div>"
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


def render(data: dict[str, Any]) -> str:
    """The whole page: ``data`` as inline JSON, drawn by ``explorer.js``."""
    script = resources.files("featurescope.study").joinpath("explorer.js").read_text("utf-8")
    payload = inert_json(data)
    curves = (
        "<h2>Training: width × batch size</h2><div id='fs-curves'></div>" if data["runs"] else ""
    )
    warnings = "".join(
        f"<p class='fs-note fs-warn' id='fs-{key}'>{html.escape(text)}</p>"
        for key, text in data["notes"].items()
    )
    method = data["projection"]["method"]
    colour = "Coloured by class; click" if data["classes"] else "Click"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {script_hash(script)}">
<title>{html.escape(data["title"])}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(data["title"])}</h1>
<p class="fs-note" id="fs-about">{html.escape(data["model"])}, embedding node
{html.escape(data["node"])}; {len(data["queries"])} {html.escape(data["wording"]["queries"])},
{len(data["gallery"])} {html.escape(data["wording"]["gallery"])} shown. featurescope
{html.escape(data["version"])}. Works offline: everything is in this file.</p>
<p class="{"fs-note fs-warn" if data["weights"] == "random" else "fs-note"}" id="fs-weights">{html.escape(data["weights_sentence"])}</p>
{warnings}
{curves}
<h2>Search by image</h2>
<p class="fs-note" id="fs-search-note">{html.escape(_search_note(data))}</p>
<div id="fs-queries"></div>
<div class="fs-row"><div style="flex: 1 1 560px"><p id="fs-query-caption"></p>
<div id="fs-search-results" class="fs-tiles"></div></div>
<div><h3>Retrieval scores</h3>{_metrics_table(data["metrics"])}
{_gradcam_block(data)}</div></div>
{_maps_block(data)}
{_similarity_block(data)}
<h2>Gallery embeddings in 2-D ({html.escape(method)})</h2>
<p class="fs-note">{colour} a point for its image and its nearest neighbours.</p>
<div class="fs-row"><div id="fs-projection"></div><div><img id="fs-point-image" alt=""
style="display:none;width:120px"><p id="fs-point-caption" class="fs-note"></p>
<div id="fs-point-neighbours" class="fs-tiles"></div></div></div>
<script id="fs-data" type="application/json">{payload}</script>
<script>{script}</script>
</body></html>
"""


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
