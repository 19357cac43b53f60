"""The plugin manager: builtin plugins, entry-point discovery and the switches that control it.

featurescope follows pytest and datasette: one :class:`pluggy.PluginManager` named
``"featurescope"``, the builtin models and visualizers registered first as ordinary plugin
modules (:data:`DEFAULT_PLUGINS`), then third-party plugins from the entry-point group
``featurescope``. Set ``FEATURESCOPE_DISABLE_PLUGIN_AUTOLOAD=1`` to skip the entry points.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pluggy

from featurescope import hookspecs
from featurescope.errors import PluginError

__all__ = [
    "DEFAULT_PLUGINS",
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "call_registry_hook",
    "get_plugin_manager",
    "list_plugins",
    "register_plugin",
    "unregister_plugin",
]

ENTRY_POINT_GROUP = "featurescope"
DISABLE_AUTOLOAD_ENV = "FEATURESCOPE_DISABLE_PLUGIN_AUTOLOAD"

#: Builtin plugin modules, registered in this order before any third-party plugin.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "featurescope.zoo.alexnet",
    "featurescope.zoo.torchvision_models",
)


@dataclass(frozen=True)
class PluginInfo:
    """Where a loaded plugin came from, as listed by ``featurescope plugins``."""

    name: str
    source: str  # "builtin", "entry point", or "registered"
    module: str
    distribution: str | None = None
    version: str | None = None


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_infos: dict[str, PluginInfo] = {}


def _autoload_disabled() -> bool:
    # Tests never load installed plugins by accident (datasette's sys._called_from_test).
    if getattr(sys, "_called_from_test", False):
        return True
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _load_builtins(pm: pluggy.PluginManager) -> None:
    for modname in DEFAULT_PLUGINS:
        module = importlib.import_module(modname)
        pm.register(module, name=modname)
        _infos[modname] = PluginInfo(modname, "builtin", modname)


def load_entrypoints(pm: pluggy.PluginManager | None = None) -> list[str]:
    """Load third-party plugins from the ``featurescope`` entry-point group.

    This mirrors :meth:`pluggy.PluginManager.load_setuptools_entrypoints`, one entry point at a
    time, so that a plugin that fails to import is named in the error.

    Returns:
        The names of the plugins newly loaded.

    Raises:
        PluginError: an entry point failed to load; the message names it and its distribution.
    """
    pm = pm or get_plugin_manager()
    loaded = []
    with _lock:
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP:
                    continue
                if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                    continue
                dist_name = dist.metadata["Name"]
                try:
                    plugin = ep.load()
                except Exception as exc:
                    raise PluginError(
                        f"plugin {ep.name!r} ({ep.value}, from distribution {dist_name!r}) failed "
                        f"to load: {type(exc).__name__}: {exc}. Fix or uninstall that package, "
                        f"or set {DISABLE_AUTOLOAD_ENV}=1 to skip third-party plugins."
                    ) from exc
                pm.register(plugin, name=ep.name)
                _infos[ep.name] = PluginInfo(
                    ep.name, "entry point", ep.value, dist_name, dist.version
                )
                loaded.append(ep.name)
    return loaded


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, creating it (and loading plugins) on first use."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager("featurescope")
            pm.add_hookspecs(hookspecs)
            _load_builtins(pm)
            _pm = pm
            if not _autoload_disabled():
                load_entrypoints(pm)
        return _pm


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object (usually a module) at run time, as an entry point would.

    Returns:
        The name it was registered under.

    Example:
        >>> import types, featurescope
        >>> from featurescope import hookimpl
        >>> plugin = types.SimpleNamespace()
        >>> plugin.featurescope_register_models = hookimpl(lambda: {})
        >>> name = register_plugin(plugin, name="doc-example")
        >>> "doc-example" in [p.name for p in list_plugins()]
        True
        >>> unregister_plugin("doc-example")
    """
    pm = get_plugin_manager()
    with _lock:
        registered = pm.register(plugin, name=name)
        if registered is None:
            raise PluginError(f"plugin {name!r} is blocked; unblock it before registering it")
        module = getattr(plugin, "__name__", type(plugin).__name__)
        _infos[registered] = PluginInfo(registered, "registered", str(module))
        return registered


def unregister_plugin(name: str) -> None:
    """Remove a plugin by name; builtins may be removed too, to replace them wholesale."""
    pm = get_plugin_manager()
    with _lock:
        if pm.get_plugin(name) is None:
            raise PluginError(f"no plugin named {name!r} is registered")
        pm.unregister(name=name)
        _infos.pop(name, None)


def list_plugins() -> list[PluginInfo]:
    """Every registered plugin, builtins first, with where it came from."""
    pm = get_plugin_manager()
    with _lock:
        return [
            _infos.get(name, PluginInfo(name, "registered", str(getattr(plugin, "__name__", name))))
            for name, plugin in pm.list_name_plugin()
        ]


T = TypeVar("T")


def call_registry_hook(
    hook_name: str, kind: str, convert: Callable[[str, Any, str], T] | None = None
) -> dict[str, tuple[T, str]]:
    """Call a ``{name: thing}`` hook on every plugin and merge the results.

    Each plugin is called on its own, so an exception is re-raised naming the plugin. Builtins
    are merged first; a non-builtin plugin may override a builtin name, but two plugins of the
    same standing that give one name raise :class:`PluginError` naming both.

    Args:
        hook_name: e.g. ``"featurescope_register_models"``.
        kind: what the names are, for messages (``"model"``, ``"visualizer"``).
        convert: optional ``convert(name, value, plugin_name)`` applied to each entry.

    Returns:
        ``{name: (value, plugin_name)}``.
    """
    pm = get_plugin_manager()
    hook = getattr(pm.hook, hook_name)
    merged: dict[str, tuple[T, str]] = {}
    builtin = set(DEFAULT_PLUGINS)
    # get_hookimpls() lists implementations in registration order (pluggy calls them LIFO).
    for impl in hook.get_hookimpls():
        plugin_name = impl.plugin_name
        try:
            result = impl.function()
        except Exception as exc:
            raise PluginError(
                f"plugin {plugin_name!r} raised in {hook_name}: {type(exc).__name__}: {exc}"
            ) from exc
        if result is None:
            continue
        if not isinstance(result, Mapping):
            raise PluginError(
                f"plugin {plugin_name!r}: {hook_name} must return a dict of {{name: {kind}}}, "
                f"got {type(result).__name__}"
            )
        for name, value in result.items():
            if not isinstance(name, str) or not name:
                raise PluginError(
                    f"plugin {plugin_name!r}: {hook_name} gave a {kind} name {name!r}; "
                    "names must be non-empty strings"
                )
            if name in merged:
                previous = merged[name][1]
                if not (previous in builtin and plugin_name not in builtin):
                    raise PluginError(
                        f"{kind} {name!r} is registered by two plugins, {previous!r} and "
                        f"{plugin_name!r}; uninstall or unregister one of them "
                        "(featurescope.plugins.unregister_plugin) to choose"
                    )
            converted = convert(name, value, plugin_name) if convert else value
            merged[name] = (converted, plugin_name)
    return merged
