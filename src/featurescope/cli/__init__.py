"""The ``featurescope`` command: argparse subcommands over the public Python API.

Each subcommand lives in its own module listed in :data:`COMMAND_MODULES`; a module defines
``register(subparsers)`` which adds its parser(s) and sets ``func`` to a handler taking the parsed
``argparse.Namespace`` and returning an exit code. Handlers only call the library: the CLI holds
no logic the Python API lacks.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from featurescope._version import __version__
from featurescope.errors import FeaturescopeError

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

COMMAND_MODULES: tuple[str, ...] = (
    "featurescope.cli._zoo",
    "featurescope.cli._plugins",
    "featurescope.cli._tap",
    "featurescope.cli._study",
    "featurescope.cli._explore",
    "featurescope.cli._compare",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 1 a featurescope error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FeaturescopeError as exc:
        print(f"featurescope {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
