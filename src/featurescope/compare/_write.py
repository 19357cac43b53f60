"""A comparison written to a folder: the heat map, the matrix as CSV and JSON, and a page."""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path

from featurescope._io import atomic_open
from featurescope.compare._result import Comparison

__all__ = ["write_comparison"]

FIGURE = "similarity.png"
CSV = "matrix.csv"
JSON = "matrix.json"
PAGE = "index.html"


def write_comparison(result: Comparison, out: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``similarity.png``, ``matrix.csv``, ``matrix.json`` and ``index.html`` to ``out``.

    The page works offline: the figure is embedded, and each cell of its table shows the
    value, the two nodes and the estimator on hover.

    Returns:
        ``{"figure", "csv", "json", "page"}``: the paths written.

    Example:
        >>> import tempfile, torch
        >>> from featurescope.compare import Comparison
        >>> result = Comparison(torch.eye(2, dtype=torch.float64), (("exact",) * 2,) * 2, 10,
        ...                     ("conv1", "fc"), ("conv1", "fc"), "alexnet", "alexnet_half")
        >>> sorted(write_comparison(result, tempfile.mkdtemp()))
        ['csv', 'figure', 'json', 'page']
    """
    from featurescope.visualizers import save, visualize

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "figure": save(visualize("similarity", result), folder / FIGURE, dpi=120),
        "csv": folder / CSV,
        "json": folder / JSON,
        "page": folder / PAGE,
    }
    with atomic_open(paths["csv"], "w", encoding="utf-8") as fh:
        fh.write(result.to_csv())
    with atomic_open(paths["json"], "w", encoding="utf-8") as fh:
        json.dump(result.to_dict(), fh, indent=1)
    with atomic_open(paths["page"], "w", encoding="utf-8") as fh:
        fh.write(comparison_html(result, paths["figure"].read_bytes()))
    return paths


def comparison_table(result: Comparison) -> str:
    """The matrix as an HTML table; hovering a cell names its nodes, value and estimator."""
    esc = html.escape
    head = "".join(f"<th>{esc(b)}</th>" for b in result.nodes_b)
    rows = []
    for i, a in enumerate(result.nodes_a):
        cells = []
        for j, b in enumerate(result.nodes_b):
            value = float(result.matrix[i, j])
            shown = "n/a" if math.isnan(value) else f"{value:.3f}"
            hover = f"{result.model_a} {a} × {result.model_b} {b}: {value!r} ({result.estimators[i][j]})"
            cells.append(f'<td title="{esc(hover)}">{shown}</td>')
        rows.append(f"<tr><th>{esc(a)}</th>{''.join(cells)}</tr>")
    return (
        f'<table class="cka"><tr><th>{esc(result.model_a)} \\ {esc(result.model_b)}</th>'
        f"{head}</tr>{''.join(rows)}</table>"
    )


def comparison_html(result: Comparison, png: bytes) -> str:
    """A self-contained page of the comparison: the figure (embedded) and the table."""
    esc = html.escape
    image = base64.b64encode(png).decode("ascii")
    title = f"{result.model_a} vs {result.model_b}: linear CKA"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}
table.cka{{border-collapse:collapse}} .cka td,.cka th{{border:1px solid #ccc;padding:.3em .6em}}
.cka td{{text-align:right;font-variant-numeric:tabular-nums}}</style></head>
<body><h1>{esc(title)}</h1>
<p>{result.num_images} images, features {esc(result.reduce)}ed, batches of {result.batch_size}.
Exact cells: the whole dataset's CKA; minibatch cells (marked * in the figure): the unbiased
HSIC<sub>1</sub> averaged over {result.num_batches} batches. Hover a cell for its value.</p>
<img src="data:image/png;base64,{image}" alt="{esc(title)}">
{comparison_table(result)}
</body></html>
"""
