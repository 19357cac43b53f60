"""The gallery's scraper shows each figure an example holds, once, in the order it was bound."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "_ext"))
import featurescope_gallery as gallery


def _figure() -> Figure:
    figure = Figure()
    figure.add_subplot()
    return figure


def test_figures_are_found_in_globals_and_one_level_into_containers():
    a, b, c, d = (_figure() for _ in range(4))
    namespace = {"a": a, "n": 3, "pairs": {"x": (b, c)}, "listed": [d, "text"], "again": a}
    assert list(gallery.figures_in(namespace)) == [a, b, c, d, a]


def test_each_new_figure_is_shown_once_and_empty_ones_wait(tmp_path):
    pytest.importorskip("sphinx_gallery")
    from sphinx_gallery.scrapers import ImagePathIterator

    paths = ImagePathIterator(str(tmp_path / "image_{0:03}.png"))
    empty = Figure()
    namespace = {"first": _figure(), "empty": empty, "same": None}
    namespace["same"] = namespace["first"]
    conf = {"src_dir": str(tmp_path)}

    def scrape() -> str:
        return gallery.scraper(
            None, {"example_globals": namespace, "image_path_iterator": paths}, conf
        )

    gallery.reset(conf, None)
    assert "image_001.png" in scrape() and sorted(p.name for p in tmp_path.iterdir()) == [
        "image_001.png"
    ]
    assert scrape() == ""  # nothing new
    empty.add_subplot()
    namespace["later"] = _figure()
    shown = scrape()
    assert "image_002.png" in shown and "image_003.png" in shown
    gallery.reset(conf, None)  # the next example shows its own figures again
    assert "image_004.png" in scrape()
