"""sphinx-gallery glue: show every figure an example creates, pyplot or not.

featurescope's visualizers build :class:`matplotlib.figure.Figure` objects without pyplot, so
the stock matplotlib scraper (which asks pyplot for its figures) would miss them. Here every
Figure created while an example runs is remembered, in creation order, and the scraper writes
the ones created by the code block that just ran. Examples need no gallery-specific code.

Referenced from ``conf.py`` by name (``"featurescope_gallery.scraper"``) so that Sphinx can
pickle its configuration.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path, PurePosixPath
from typing import Any

_created: list[Any] = []
_installed = False

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


def _install() -> None:
    global _installed
    if _installed:
        return
    from matplotlib.figure import Figure

    original = Figure.__init__

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _created.append(self)

    Figure.__init__ = init  # type: ignore[method-assign]
    _installed = True


def reset(gallery_conf: dict[str, Any], fname: str | None) -> None:
    """Before each example: forget earlier figures, close pyplot's, restore rc defaults."""
    _install()
    _created.clear()
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        plt.close("all")
    import matplotlib

    matplotlib.rcdefaults()


def scraper(block: Any, block_vars: dict[str, Any], gallery_conf: dict[str, Any], **_: Any) -> str:
    """Save the figures the last code block created and return the reST that shows them."""
    from sphinx_gallery.scrapers import figure_rst

    _install()
    figures, _created[:] = list(_created), []
    paths = []
    for fig, path in zip(figures, block_vars["image_path_iterator"], strict=False):
        # A figure may already be closed or never drawn into; skip empty ones.
        if not fig.axes:
            continue
        fig.savefig(path, dpi=100)
        paths.append(PurePosixPath(path))
    if "matplotlib.pyplot" in sys.modules:
        import matplotlib.pyplot as plt

        plt.close("all")
    if not paths:
        return ""
    return figure_rst(paths, gallery_conf["src_dir"])
