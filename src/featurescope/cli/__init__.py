"""The ``featurescope`` command: argparse subcommands over the public Python API.

Each subcommand lives in its own module listed in :data:`COMMAND_MODULES`; a module defines
``register(subparsers)`` which adds its parser(s) and sets ``func`` to a handler taking the parsed
``argparse.Namespace`` and returning an exit code. Handlers only call the library: the CLI holds
no logic the Python API lacks. Parsing imports no torch (handlers import the library), so
``--help`` and ``--version`` answer at once. An expected failure is one line,
``featurescope COMMAND: error: ...``, and exit code 1: featurescope's errors, the disk's
(permissions, a full or read-only disk, a path in the way), a missing GPU or its memory, an
image too large to be safe to decode; Ctrl-C is one line and exit code 130. Anything else is a
bug and keeps its traceback; ``--debug`` shows the traceback of an expected failure too.
featurescope's warnings are one line each. Control characters in what is printed are escaped
(:func:`~featurescope.cli._args.shown`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from featurescope._printable import printable
from featurescope._version import __version__
from featurescope.cli._args import LIST_OPTIONS, LIST_OPTIONS_HINT
from featurescope.errors import FeaturescopeError, FeaturescopeWarning

__all__ = ["COMMAND_MODULES", "build_parser", "main", "warnings_as_lines"]

COMMAND_MODULES: tuple[str, ...] = (
    "featurescope.cli._zoo",
    "featurescope.cli._plugins",
    "featurescope.cli._tap",
    "featurescope.cli._study",
    "featurescope.cli._explore",
    "featurescope.cli._weights",
    "featurescope.cli._compare",
    "featurescope.cli._serve",
    "featurescope.cli._units",
)


def build_parser() -> argparse.ArgumentParser:
    """The ``featurescope`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="featurescope",
        description=(
            "See inside convolutional networks: feature maps of any layer of any zoo model (the "
            "study's AlexNets, every torchvision classifier, timm's as timm/<name>), search by "
            "image over any folder of photos, and an offline page to explore them. Run "
            "'featurescope COMMAND --help' for each command's options."
        ),
    )
    parser.add_argument("--version", action="version", version=f"featurescope {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of any failure (also accepted after the command)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for modname in COMMAND_MODULES:
        importlib.import_module(modname).register(subparsers)
    return parser


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Show each of featurescope's warnings as one plain line on stderr, without Python's file
    and source line; other warnings as Python shows them.

    Example:
        >>> import io
        >>> err = io.StringIO()
        >>> with contextlib.redirect_stderr(err), warnings_as_lines():
        ...     warnings.warn("skipped 1 of 3 files in photos", FeaturescopeWarning)
        >>> print(err.getvalue(), end="")
        featurescope: skipped 1 of 3 files in photos
    """
    with warnings.catch_warnings():
        # The command line decides how its warnings look, whatever filters the caller set.
        warnings.simplefilter("default", FeaturescopeWarning)
        show_others = warnings.showwarning

        def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            if issubclass(category, FeaturescopeWarning):
                print(f"featurescope: {printable(str(message))}", file=sys.stderr)
            else:
                show_others(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


#: What to do about an :class:`OSError`, by ``errno``.
_OS_HINTS = {
    errno.EACCES: "check the permissions, or choose another path",
    errno.EPERM: "check the permissions, or choose another path",
    errno.EROFS: "the file system is read-only; choose a path on a writable disk",
    errno.ENOSPC: "the disk is full; free some space or choose a path on another disk",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another disk",
    errno.EEXIST: "something is already there; remove it or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder; give a file name",
    errno.ENOENT: "it does not exist",
}

# PIL warns of, then refuses, images over Image.MAX_IMAGE_PIXELS; matched by message so that
# parsing imports no PIL. Its warning becomes an error here: the command stops with one line.
_BOMB_WARNING = r"Image size \(\d+ pixels\) exceeds limit"


def _os_error_line(exc: OSError) -> str:
    """``exc`` as one line naming the path(s) and what to do."""
    line = exc.strerror or str(exc)
    paths = [f for f in (exc.filename, exc.filename2) if f is not None]
    if paths:
        line += ": " + " -> ".join(f"'{os.fsdecode(f)}'" for f in paths)
    hint = _OS_HINTS.get(exc.errno or 0)
    return f"{line} ({hint})" if hint else line


def _expected_failure(exc: BaseException) -> str | None:
    """The one line an expected failure is shown as; ``None`` for a bug (keep the traceback)."""
    if isinstance(exc, FeaturescopeError):
        return str(exc)
    name = type(exc).__name__
    if name in ("DecompressionBombError", "DecompressionBombWarning"):
        return (
            f"an image is too large to decode safely ({exc}); PIL refuses images over "
            "PIL.Image.MAX_IMAGE_PIXELS, which a decompression bomb would exceed"
        )
    if isinstance(exc, OSError):
        return _os_error_line(exc)
    if name == "OutOfMemoryError":  # torch's, a RuntimeError: the GPU's memory is used up
        first = str(exc).splitlines()[0] if str(exc) else name
        return f"{first} (use a smaller --batch-size, or --device cpu)"
    if isinstance(exc, (RuntimeError, AssertionError)) and any(
        word in str(exc) for word in ("CUDA", "NVIDIA driver")
    ):
        first = str(exc).splitlines()[0]
        return f"CUDA is not usable here: {first} (use --device cpu)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    0 success, 1 an expected failure (one line on stderr), 2 a usage error, 130 interrupted.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if "--debug" in unknown:  # given after the command, where the subcommand's parser left it
        args.debug = True
        unknown = [a for a in unknown if a != "--debug"]
    if unknown:
        given = sys.argv[1:] if argv is None else list(argv)
        listed = any(a.split("=")[0] in LIST_OPTIONS for a in given)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{LIST_OPTIONS_HINT * listed}")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        with warnings_as_lines():
            warnings.filterwarnings("error", message=_BOMB_WARNING)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"featurescope {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        line = _expected_failure(exc)
        if line is None:
            raise  # a bug: its traceback is what a report needs
        if args.debug:
            traceback.print_exc()
        print(f"featurescope {args.command}: error: {printable(line)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
