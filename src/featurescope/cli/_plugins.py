"""``featurescope plugins``: what is loaded, where from, and what each plugin provides."""

from __future__ import annotations

import argparse
from typing import Any

from featurescope.cli._args import shown


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plugins",
        help="list the loaded plugins, where each comes from and what it provides",
        description=(
            "List the builtin and third-party plugins in load order: where each comes from "
            "(builtin module, or entry point and the package that installs it) and the models "
            "and visualizers it provides. A name overridden by a later plugin is marked. "
            "Set FEATURESCOPE_DISABLE_PLUGIN_AUTOLOAD=1 to skip third-party plugins."
        ),
    )
    p.add_argument("--hooks", action="store_true", help="also list the hooks each one implements")
    p.set_defaults(func=_plugins)


def _winners() -> dict[str, dict[str, str]]:
    from featurescope.errors import PluginError
    from featurescope.visualizers import VISUALIZERS
    from featurescope.zoo import MODELS

    winners: dict[str, dict[str, str]] = {}
    for kind, registry in (("models", MODELS), ("visualizers", VISUALIZERS)):
        try:
            entries = registry.entries()
        except PluginError:
            entries = {}  # the per-plugin listing below reports the culprit
        winners[kind] = {name: entry.plugin for name, entry in entries.items()}
    return winners


def _plugins(args: argparse.Namespace) -> int:
    from featurescope.errors import PluginError
    from featurescope.plugins import (
        DISABLE_AUTOLOAD_ENV,
        autoload_disabled,
        list_plugins,
        plugin_provides,
    )

    winners = _winners()
    status = 0
    for info in list_plugins():
        where = info.source
        if info.distribution:
            where += f", {info.distribution} {info.version or ''}".rstrip()
        module = "" if info.module == info.name else f"  {info.module}"
        print(shown(f"{info.name}  [{where}]{module}"))
        if args.hooks:
            print(shown(f"    hooks: {', '.join(info.hooks) or '-'}"))
        try:
            provides = plugin_provides(info.name)
        except PluginError as exc:
            print(shown(f"    error: {exc}"))
            status = 1
            continue
        for kind, names in provides.items():
            if not names:
                continue
            names_shown = []
            for name in names:
                winner = winners[kind].get(name)
                if winner and winner != info.name:
                    names_shown.append(f"{name} (overridden by {winner})")
                else:
                    names_shown.append(name)
            print(shown(f"    {kind}: {', '.join(names_shown)}"))
    if autoload_disabled():
        print(f"(third-party plugins are not loaded: {DISABLE_AUTOLOAD_ENV} is set)")
    return status
