"""A plugin for tests: a module holding the given hook implementations, as a real plugin is."""

from __future__ import annotations

import types
from typing import Any

from featurescope import hookimpl


def plugin_module(name: str = "test_plugin", **hooks: Any) -> types.ModuleType:
    """A module whose attributes are ``hooks``, each marked with ``@hookimpl``.

    A module rather than a ``SimpleNamespace``: pluggy tells plugins apart by hash.
    """
    module = types.ModuleType(name)
    for hook, function in hooks.items():
        setattr(module, hook, hookimpl(function))
    return module
