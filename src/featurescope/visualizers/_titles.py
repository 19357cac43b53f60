"""Titles that fit their figure: wrapped to its width, with room made above the axes.

A long node name (``"features.7.2.block.5"``) or class name would otherwise run past the
figure's edge and be cut when saved. Text is measured the way it is drawn (matplotlib's own
font metrics, in points, so the result holds at any dpi), wrapped at spaces, and where one word
is still too wide, after a dot, underscore, slash, dash or parenthesis, or anywhere at last: no
character is dropped.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["fit_suptitle", "place_title", "room_for_title", "title_size", "wrap_text"]

# Glyph widths differ by a pixel or so between the metrics and a rasteriser's hinting.
_SAFETY = 0.92
_LINE_SPACING = 1.2  # matplotlib's default linespacing
_BREAKS = re.compile(r"[^._/(\-]*[._/(\-]?")


def _width(text: str, size: float) -> float:
    """``text``'s width in points at font ``size``, from matplotlib's own metrics."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    width, _, _ = TextToPath().get_text_width_height_descent(
        text, FontProperties(size=size), ismath=False
    )
    return float(width)


def _pieces(word: str, size: float, limit: float) -> list[str]:
    """``word`` cut into parts no wider than ``limit``, after punctuation where possible."""
    parts = [p for p in _BREAKS.findall(word) if p]
    out: list[str] = []
    for part in parts:
        while _width(part, size) > limit and len(part) > 1:
            cut = max(1, max(n for n in range(1, len(part)) if _width(part[:n], size) <= limit))
            out.append(part[:cut])
            part = part[cut:]
        out.append(part)
    return out


def wrap_text(text: str, size: float, width: float) -> str:
    """``text`` with line breaks so that no line is wider than ``width`` inches at ``size`` pt.

    Example:
        >>> text = wrap_text("Grad-CAM: class 3 (classifier.0.permute_1)", 10, 1.2)
        >>> text.count("\\n") > 0, text.replace("\\n", "").replace(" ", "")
        (True, 'Grad-CAM:class3(classifier.0.permute_1)')
        >>> wrap_text("short", 10, 1.2)
        'short'
    """
    limit = width * 72.0 * _SAFETY
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            joined = f"{line} {word}" if line else word
            if _width(joined, size) <= limit:
                line = joined
                continue
            if line:
                lines.append(line)
            line = ""
            for piece in _pieces(word, size, limit):
                if line and _width(line + piece, size) > limit:
                    lines.append(line)
                    line = ""
                line += piece
        lines.append(line)
    return "\n".join(lines)


def title_size(height: float) -> float:
    """The title's font size for a figure ``height`` inches tall: the theme's, smaller when small."""
    from matplotlib import rcParams
    from matplotlib.font_manager import FontProperties

    themed = FontProperties(size=rcParams["axes.titlesize"]).get_size_in_points()
    return float(min(themed, max(7.0, 3.5 * height)))


def place_title(fig: Figure, ax: Axes, title: str, size: float) -> float:
    """Set ``ax``'s title wrapped to the axes' width; return the height it needs in inches.

    Call it once the axes are placed across (after any colour bar took its room): the title is
    centred on the axes, so no wider than them it stays inside the figure. The caller leaves
    the height returned free at the top (``subplots_adjust(top=...)``).
    """
    width = ax.get_position(original=True).width * fig.get_figwidth()
    text = wrap_text(title, size, width)
    pad = 4.0  # points between the title and the axes
    ax.set_title(text, fontsize=size, pad=pad)
    lines = text.count("\n") + 1
    return (lines * size * _LINE_SPACING + pad + 2.0) / 72.0


def room_for_title(fig: Figure, header: float, margin: float = 0.02) -> float:
    """The axes' top (a figure fraction) that leaves ``header`` inches above them.

    A title taller than half the figure (a long one on a small figure) makes the figure
    taller instead of squashing the axes under it.
    """
    height = fig.get_figheight()
    if header > 0.5 * height:
        height += header - 0.5 * height
        fig.set_figheight(height)
    return 1.0 - margin - header / height


def fit_suptitle(title: str, width: float) -> tuple[str, float]:
    """A figure title wrapped to ``width`` inches, and the height in inches it needs above the axes.

    Example:
        >>> text, height = fit_suptitle("conv1 of alexnet", 6.0)
        >>> text, 0.2 < height < 0.5
        ('conv1 of alexnet', True)
    """
    from matplotlib import rcParams
    from matplotlib.font_manager import FontProperties

    size = FontProperties(size=rcParams["figure.titlesize"]).get_size_in_points()
    text = wrap_text(title, size, width)
    lines = text.count("\n") + 1
    return text, (lines * size * _LINE_SPACING + 8.0) / 72.0
