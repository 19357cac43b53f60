"""Names as a terminal may safely show them: control characters and undecodable bytes escaped.

A file name may hold any byte but ``/`` and NUL: escape sequences that recolour or clear a
terminal, newlines that forge extra output lines, right-to-left marks that reorder what
follows, or bytes that are not UTF-8 (which Python keeps as lone surrogates, PEP 383).
:func:`printable` escapes exactly those, so one name stays one inert line, and the original
bytes can be read back from the escapes.
"""

from __future__ import annotations

__all__ = ["printable"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte surrogateescape kept from an undecodable name
        return f"\\x{code - 0xDC00:02x}"
    if ch in _NAMED:
        return _NAMED[ch]
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every character a terminal would not print as itself escaped.

    Control characters (``ESC``, newline, ``DEL``, C1 codes), invisible format characters
    (right-to-left overrides, zero-width joiners), separators other than the plain space, and
    lone surrogates are written as Python escapes; a surrogate that stands for an undecodable
    byte of a file name (``os.fsdecode``'s surrogateescape) as that byte, ``\\xe9``. Every other
    character, accented letters and CJK included, is left as it is.

    Args:
        text: a file name, a path, or a message holding them.

    Returns:
        The text, safe to print on one line.

    Example:
        >>> printable("photos/cat.png")
        'photos/cat.png'
        >>> print(printable("evil\\x1b[2J\\nname.png"))
        evil\\x1b[2J\\nname.png
        >>> import os
        >>> print(printable(os.fsdecode(b"caf\\xe9.png")), printable("café.png"))
        caf\\xe9.png café.png
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
