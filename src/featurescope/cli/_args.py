"""Argument helpers several commands share: lists of names, ``--device``, and early checks of
the files a command reads and writes, so that a wrong path is reported before a model is built.

Nothing here imports torch at module level: the parser must build without it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from featurescope._printable import printable
from featurescope.errors import FeaturescopeError

__all__ = [
    "LIST_OPTIONS",
    "LIST_OPTIONS_HINT",
    "add_device_option",
    "add_list_option",
    "check_device",
    "check_file",
    "check_folder",
    "check_output",
    "int_at_least",
    "positive_float",
    "positive_int",
    "shown",
]

#: The flags :func:`add_list_option` made, for :data:`LIST_OPTIONS_HINT`.
LIST_OPTIONS: set[str] = set()
#: Appended to argparse's "unrecognized arguments" when a list option was given.
LIST_OPTIONS_HINT = (
    " (an option that takes several names takes them comma-separated or repeated: "
    "--layers conv1,conv2 or --layers conv1 --layers conv2)"
)


def shown(path: str | bytes | os.PathLike[str]) -> str:
    r"""``path`` as the command line prints it: control characters and undecodable bytes escaped.

    Every handler prints file names through this, so a name holding an escape sequence cannot
    recolour or clear the terminal and a newline in a name cannot forge an output line.

    Example:
        >>> print(shown("photos/\x1b[31mred.png"))
        photos/\x1b[31mred.png
    """
    return printable(os.fsdecode(path))


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number of at least 1 (``--batch-size 0`` is refused).

    Example:
        >>> positive_int("8")
        8
        >>> positive_int("0")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: expected a positive whole number, got '0'
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``low`` (``--batch-size 2`` where the
    command needs 4, ``--seed -1``).

    Example:
        >>> int_at_least(4)("4")
        4
        >>> int_at_least(0)("-1")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: expected a whole number of at least 0, got '-1'
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(
                f"expected a whole number of at least {low}, got {text!r}"
            )
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number above 0 (a learning rate, a fraction).

    Example:
        >>> positive_float("0.01")
        0.01
        >>> positive_float("nan")
        Traceback (most recent call last):
        ...
        argparse.ArgumentTypeError: expected a positive number, got 'nan'
    """
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    """``"conv1,conv2"`` -> ``["conv1", "conv2"]``; empty items are refused."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected NAME[,NAME...], got {text!r}")
    return names


def add_list_option(p: argparse.ArgumentParser, flag: str, *, metavar: str, help: str) -> None:
    """An option taking several names as ``--flag a,b`` or ``--flag a --flag b``.

    One value per flag, unlike ``nargs="+"``, which would swallow the positional arguments that
    follow it (``maps --layers conv1 photo.jpg`` would take the photo for a layer).
    """
    LIST_OPTIONS.add(flag)
    p.add_argument(
        flag,
        action="extend",
        type=_names,
        metavar=f"{metavar}[,{metavar}...]",
        help=f"{help}; comma-separated, or the option repeated",
    )


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps, ... (default: CUDA when available)")


def check_device(device: str | None) -> Any:
    """The ``torch.device`` of ``--device``, or a one-line error when this machine has none."""
    from featurescope._torch_utils import resolve_device

    return resolve_device(device)


def check_file(path: str, what: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`, or an error saying it is not an existing file."""
    p = Path(path).expanduser()
    if not p.is_file():
        if p.is_dir():
            state = "is a folder, not a file"
        elif p.exists():  # a named pipe, a socket, a device: reading it could wait forever
            state = "is not a regular file (a named pipe, socket or device?)"
        else:
            state = "does not exist"
        raise FeaturescopeError(f"{what} '{shown(path)}' {state}")
    return p


def check_folder(path: str, what: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`, or an error saying it is not an existing folder."""
    p = Path(path).expanduser()
    if not p.is_dir():
        state = "is a file, not a folder" if p.exists() else "does not exist"
        raise FeaturescopeError(f"{what} '{shown(path)}' {state}")
    return p


def check_output(path: str, *, folder: bool, replaceable: str | None = None) -> Path:
    """Refuse an output path that cannot be written before any work is done.

    Args:
        path: the ``--out`` value.
        folder: whether the output is a folder (else a file).
        replaceable: for an output folder, the file that marks one this command may replace
            (``search.json``); an existing folder without it is refused.
    """
    p = Path(path).expanduser()
    if folder and p.exists() and not p.is_dir():
        raise FeaturescopeError(f"--out {path!r} is a file; give a folder")
    if not folder and p.is_dir():
        raise FeaturescopeError(f"--out {path!r} is a folder; give a file name")
    if replaceable and p.is_dir() and not (p / replaceable).is_file():
        raise FeaturescopeError(
            f"--out {path!r} is an existing folder without {replaceable}, which this command "
            "would replace; give a new folder"
        )
    parent = next((a for a in p.absolute().parents if a.exists()), None)
    if parent is not None and not parent.is_dir():
        raise FeaturescopeError(f"--out {path!r}: {parent} is a file, not a folder")
    return p
