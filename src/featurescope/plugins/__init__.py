"""The plugin manager: builtin plugins, entry-point discovery, the switches, and one registry.

featurescope follows pytest and datasette: one :class:`pluggy.PluginManager` named
``"featurescope"``, the builtin models and visualizers registered first as ordinary plugin
modules (:data:`DEFAULT_PLUGINS`), then third-party plugins from the entry-point group
``featurescope``. Set ``FEATURESCOPE_DISABLE_PLUGIN_AUTOLOAD=1`` to skip the entry points.

``_manager`` holds the manager and where each plugin came from; ``_registry`` the generic
:class:`Registry` that the zoo and the visualizers build on. pluggy calls every hook, as
``get_plugin_manager().hook.<name>(...)``; an exception raised inside a plugin reaches the
caller as a :class:`~featurescope.PluginError` that names the plugin and the hook, with the
original exception as its ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Mapping

from featurescope.errors import PluginError, PluginOverrideWarning, did_you_mean
from featurescope.plugins._manager import (
    DEFAULT_PLUGINS,
    DISABLE_AUTOLOAD_ENV,
    ENTRY_POINT_GROUP,
    PluginInfo,
    _lock,
    autoload_disabled,
    get_plugin_manager,
    hook_failed,
    hook_names,
    invalidate,
    load_entrypoints,
    plugin_raised,
    reset,
    source_of,
)
from featurescope.plugins._manager import _register as _register_checked
from featurescope.plugins._registry import Entry, Registry, ask

__all__ = [
    "DEFAULT_PLUGINS",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "REGISTRY_HOOKS",
    "Entry",
    "PluginInfo",
    "PluginOverrideWarning",
    "Registry",
    "autoload_disabled",
    "get_plugin_manager",
    "hook_failed",
    "invalidate",
    "list_plugins",
    "load_entrypoints",
    "plugin_provides",
    "plugin_raised",
    "register_plugin",
    "unregister_plugin",
]

#: The ``{name: thing}`` hooks, keyed by what they register (as ``featurescope plugins`` shows).
REGISTRY_HOOKS: Mapping[str, str] = {
    "models": "featurescope_register_models",
    "visualizers": "featurescope_register_visualizers",
}

#: Forget the plugin manager so that the next use builds it afresh (for tests).
_reset = reset


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object (usually a module) at run time, as an entry point would.

    Its names take part in the same override and clash rules as an installed plugin's. A plugin
    must be hashable (a module, a class, an ordinary object), as pluggy needs.

    Args:
        plugin: a module, class or object with ``@hookimpl`` functions.
        name: the name to list it under; default its ``__name__``.

    Returns:
        The name it was registered under.

    Raises:
        PluginError: the name is taken or blocked, or the plugin implements a hook that does
            not exist (the message suggests the closest hook name).

    Example:
        >>> import types
        >>> from featurescope import hookimpl
        >>> plugin = types.ModuleType("doc_example")
        >>> plugin.featurescope_register_models = hookimpl(lambda: {})
        >>> name = register_plugin(plugin, name="doc-example")
        >>> "doc-example" in [p.name for p in list_plugins()]
        True
        >>> unregister_plugin("doc-example")
    """
    pm = get_plugin_manager()
    with _lock:
        registered = _register_checked(pm, plugin, name)
        if registered is None:
            raise PluginError(
                f"plugin {name or pm.get_canonical_name(plugin)!r} is blocked; unblock it "
                "(get_plugin_manager().unblock(name)) before registering it"
            )
        return registered


def unregister_plugin(name: str) -> None:
    """Remove a plugin by name; builtins may be removed too, to replace them wholesale.

    Raises:
        PluginError: no plugin has that name.

    Example:
        >>> import types
        >>> from featurescope import hookimpl
        >>> plugin = types.ModuleType("doc_noop")
        >>> plugin.featurescope_register_visualizers = hookimpl(lambda: {"noop_doc": print})
        >>> register_plugin(plugin, name="doc-noop")
        'doc-noop'
        >>> unregister_plugin("doc-noop")
        >>> "doc-noop" in [p.name for p in list_plugins()]
        False
    """
    pm = get_plugin_manager()
    with _lock:
        if pm.get_plugin(name) is None:
            known = [n for n, _ in pm.list_name_plugin()]
            raise PluginError(f"no plugin named {name!r} is registered.{did_you_mean(name, known)}")
        pm.unregister(name=name)
        invalidate()


def list_plugins() -> list[PluginInfo]:
    """Every registered plugin, builtins first, with where it came from and the hooks it implements.

    Built from pluggy's own records, as datasette's ``get_plugins`` is:
    :meth:`~pluggy.PluginManager.list_name_plugin`, :meth:`~pluggy.PluginManager.get_hookcallers`
    and :meth:`~pluggy.PluginManager.list_plugin_distinfo`.

    Example:
        >>> [p.name for p in list_plugins() if p.source == "builtin"][:2]
        ['featurescope.zoo.alexnet', 'featurescope.zoo.torchvision_models']
    """
    pm = get_plugin_manager()
    order = {hook: i for i, hook in enumerate(hook_names())}
    result = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        info = source_of(pm, name, plugin)
        callers = pm.get_hookcallers(plugin) or []
        hooks = sorted({c.name for c in callers}, key=lambda h: order.get(h, len(order)))
        result.append(
            PluginInfo(
                info.name, info.source, info.module, info.distribution, info.version, tuple(hooks)
            )
        )
    return result


def plugin_provides(name: str) -> dict[str, list[str]]:
    """What one plugin adds to each registry, as ``{"models": [...], "visualizers": [...]}``.

    Each list holds the names the plugin gives, sorted, whether or not another plugin
    overrides them.

    Raises:
        PluginError: no plugin has that name, or its hook raised.

    Example:
        >>> plugin_provides("featurescope.zoo.alexnet")
        {'models': ['alexnet', 'alexnet_half'], 'visualizers': []}
    """
    pm = get_plugin_manager()
    if pm.get_plugin(name) is None:
        known = [n for n, _ in pm.list_name_plugin()]
        raise PluginError(f"no plugin named {name!r} is registered.{did_you_mean(name, known)}")
    # Each plugin asked alone, so that it answers even while another plugin's hook is broken
    # (``featurescope plugins`` lists every plugin and names the broken one).
    return {
        kind: sorted(str(key) for key in ask(pm, hook, name, kind.rstrip("s")))
        for kind, hook in REGISTRY_HOOKS.items()
    }
