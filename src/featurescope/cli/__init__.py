"""The ``featurescope`` command: argparse subcommands over the public Python API.

Each subcommand lives in its own module listed in :data:`COMMAND_MODULES`; a module defines
``register(subparsers)`` which adds its parser(s) and sets ``func`` to a handler taking the parsed
``argparse.Namespace`` and returning an exit code. Handlers only call the library: the CLI holds
no logic the Python API lacks. Parsing imports no torch (handlers import the library), so
``--help`` and ``--version`` answer at once. An expected failure is one line,
``featurescope COMMAND: error: ...``, and featurescope's warnings one line each.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

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
                print(f"featurescope: {message}", file=sys.stderr)
            else:
                show_others(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 1 a featurescope error, 2 usage)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        given = sys.argv[1:] if argv is None else list(argv)
        listed = any(a.split("=")[0] in LIST_OPTIONS for a in given)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{LIST_OPTIONS_HINT * listed}")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        with warnings_as_lines():
            return int(args.func(args) or 0)
    except FeaturescopeError as exc:
        print(f"featurescope {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
