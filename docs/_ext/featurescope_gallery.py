"""sphinx-gallery glue: show the figures an example holds, pyplot or not.

featurescope's visualizers build :class:`matplotlib.figure.Figure` objects without pyplot, so
the stock matplotlib scraper (which asks pyplot for its figures) would miss them. This scraper
reads them where the example keeps them instead: after each code block it looks through the
example's globals (``block_vars["example_globals"]``), and one level into the lists, tuples and
dicts among them, and shows every figure it has not shown yet, in the order the names were
first bound. An example shows a figure by keeping a reference to it; nothing is patched.

Referenced from ``conf.py`` by name (``"featurescope_gallery.scraper"``) so that Sphinx can
pickle its configuration.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

# The figures already shown for the example that is running. They are kept (not their ids) so
# that a figure freed and another made at the same address is not taken for the old one.
_shown: list[Any] = []

_PLACEHOLDER = """\
Example gallery
===============

The gallery runs the numbered scripts of ``examples/`` (``01_width_comparison.py``,
``02_feature_maps.py``, ``03_image_retrieval.py``) and shows their figures. It is built once
``examples/`` has a ``GALLERY_HEADER.rst``; until then, see :doc:`../tutorial`.
"""


def has_gallery(examples: Path) -> bool:
    """Whether ``examples`` has the header file sphinx-gallery needs to build a gallery."""
    names = ("GALLERY_HEADER.rst", "GALLERY_HEADER.txt", "README.rst", "README.txt")
    return any((examples / name).is_file() for name in names)


def write_placeholder(folder: Path) -> None:
    """Write ``folder/index.rst`` saying the gallery is not built yet (only if it changed)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / "index.rst"
    if not index.is_file() or index.read_text(encoding="utf-8") != _PLACEHOLDER:
        index.write_text(_PLACEHOLDER, encoding="utf-8")


def figures_in(namespace: dict[str, Any]) -> Iterator[Any]:
    """The figures bound in ``namespace`` or held by a list, tuple or dict bound there."""
    from matplotlib.figure import Figure

    for value in list(namespace.values()):
        if isinstance(value, Figure):
            yield value
        elif isinstance(value, (list, tuple, dict)):
            items = value.values() if isinstance(value, dict) else value
            for item in items:
                nested = item if isinstance(item, (list, tuple)) else (item,)
                yield from (f for f in nested if isinstance(f, Figure))


def reset(gallery_conf: dict[str, Any], fname: str | None) -> None:
    """Before each example: forget its predecessor's figures, close pyplot's, restore rc."""
    _shown.clear()
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        plt.close("all")
    import matplotlib

    matplotlib.rcdefaults()


def scraper(block: Any, block_vars: dict[str, Any], gallery_conf: dict[str, Any], **_: Any) -> str:
    """Save the figures the example holds and has not shown yet; return the reST showing them."""
    from sphinx_gallery.scrapers import figure_rst

    new = []
    for fig in figures_in(block_vars["example_globals"]):
        if fig.axes and not any(fig is seen for seen in (*_shown, *new)):
            new.append(fig)
    _shown.extend(new)
    paths = []
    for fig, path in zip(new, block_vars["image_path_iterator"], strict=False):
        fig.savefig(path, dpi=100)
        paths.append(PurePosixPath(path))
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        plt.close("all")
    if not paths:
        return ""
    return figure_rst(paths, gallery_conf["src_dir"])
