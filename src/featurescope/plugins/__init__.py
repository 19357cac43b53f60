"""The plugin manager: builtin plugins, entry-point discovery and the switches that control it.

featurescope follows pytest and datasette: one :class:`pluggy.PluginManager` named
``"featurescope"``, the builtin models and visualizers registered first as ordinary plugin
modules (:data:`DEFAULT_PLUGINS`), then third-party plugins from the entry-point group
``featurescope``. Set ``FEATURESCOPE_DISABLE_PLUGIN_AUTOLOAD=1`` to skip the entry points.

Every hook implementation is called under its plugin's name: an exception raised inside a
plugin's hook reaches the caller as a :class:`~featurescope.PluginError` that names the plugin
and the hook, with the original exception as its ``__cause__``.
"""

from __future__ import annotations

import functools
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
from featurescope.errors import PluginError, did_you_mean

__all__ = [
    "DEFAULT_PLUGINS",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "REGISTRY_HOOKS",
    "PluginInfo",
    "autoload_disabled",
    "call_registry_hook",
    "get_plugin_manager",
    "list_plugins",
    "load_entrypoints",
    "plugin_provides",
    "register_plugin",
    "unregister_plugin",
]

ENTRY_POINT_GROUP = "featurescope"
DISABLE_AUTOLOAD_ENV = "FEATURESCOPE_DISABLE_PLUGIN_AUTOLOAD"

#: Builtin plugin modules, registered in this order before any third-party plugin.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "featurescope.zoo.alexnet",
    "featurescope.zoo.torchvision_models",
    "featurescope.visualizers.grid",
    "featurescope.visualizers.sum",
    "featurescope.visualizers.overlay",
    "featurescope.visualizers.montage",
    "featurescope.visualizers.curves",
    "featurescope.study.gradcam",
)

#: The ``{name: thing}`` hooks, keyed by what they register (as ``featurescope plugins`` shows).
REGISTRY_HOOKS: Mapping[str, str] = {
    "models": "featurescope_register_models",
    "visualizers": "featurescope_register_visualizers",
}

_HOOK_PREFIX = "featurescope_"
_BUILTIN = "builtin"


@dataclass(frozen=True)
class PluginInfo:
    """Where a loaded plugin came from, as listed by ``featurescope plugins``.

    Args:
        name: the name it is registered under (an entry point's name for installed plugins).
        source: ``"builtin"``, ``"entry point"`` or ``"registered"`` (by :func:`register_plugin`).
        module: the plugin's module, or the entry point's ``module:attr`` value.
        distribution: the installed package that provides it, for entry points.
        version: that package's version.
        hooks: the hooks it implements, in :mod:`featurescope.hookspecs` order.
    """

    name: str
    source: str
    module: str
    distribution: str | None = None
    version: str | None = None
    hooks: tuple[str, ...] = ()


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_infos: dict[str, PluginInfo] = {}


def _hook_names() -> list[str]:
    return [name for name in vars(hookspecs) if name.startswith(_HOOK_PREFIX)]


def _guarded(function: Callable[..., Any], plugin_name: str, hook_name: str) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except PluginError:
            # Already names a plugin (e.g. this hook called featurescope, which hit another one).
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {plugin_name!r} raised {type(exc).__name__} in {hook_name}: {exc}. "
                f"Fix or uninstall that plugin, or remove it for this process with "
                f"featurescope.plugins.unregister_plugin({plugin_name!r})."
            ) from exc

    return call


class _PluginManager(pluggy.PluginManager):
    """pluggy's manager, checking plugins on registration and naming them in their errors."""

    def register(self, plugin: object, name: str | None = None) -> str | None:
        label = name or self.get_canonical_name(plugin)
        _check_unmarked_hooks(plugin, label)
        try:
            registered = super().register(plugin, name)
        except pluggy.PluginValidationError as exc:
            detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise PluginError(
                f"plugin {label!r} does not fit featurescope's hooks: {detail}. Compare its hook "
                "names and arguments with featurescope.hookspecs."
            ) from exc
        except ValueError as exc:
            raise PluginError(
                f"cannot register plugin {label!r}: {exc.args[0].splitlines()[0]}. Unregister "
                "the other one first (featurescope.plugins.unregister_plugin) or pick a new name."
            ) from exc
        if registered is None:
            return None
        unknown = [
            c.name
            for c in self.get_hookcallers(plugin) or []
            if not c.has_spec()
            and any(i.plugin is plugin and not i.optionalhook for i in c.get_hookimpls())
        ]
        if unknown:
            self.unregister(name=registered)
            hint = did_you_mean(unknown[0], _hook_names())
            raise PluginError(
                f"plugin {registered!r} implements {', '.join(unknown)}, which is not a "
                f"featurescope hook.{hint} The hooks are: {', '.join(_hook_names())}."
            )
        for caller in self.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper):
                    # pluggy marks the attribute Final for its users' sake; it is a plain slot,
                    # and replacing it is the one place to hear which plugin raised.
                    impl.function = _guarded(impl.function, registered, caller.name)  # type: ignore[misc]
        return registered


def _check_unmarked_hooks(plugin: object, label: str) -> None:
    # pluggy silently ignores an undecorated function, which leaves authors wondering why
    # their visualizer never shows up.
    for hook_name in _hook_names():
        value = getattr(plugin, hook_name, None)
        if (
            callable(value)
            and not hasattr(value, f"{_HOOK_PREFIX}impl")
            and not hasattr(value, f"{_HOOK_PREFIX}spec")
        ):
            raise PluginError(
                f"plugin {label!r} defines {hook_name} without the hookimpl marker, so it "
                "would never be called; decorate it with @hookimpl "
                "(from featurescope import hookimpl)."
            )


def autoload_disabled() -> bool:
    """Whether third-party plugins are skipped: ``FEATURESCOPE_DISABLE_PLUGIN_AUTOLOAD`` is set.

    Any value but ``""``, ``0``, ``false`` or ``no`` disables autoloading. Inside featurescope's
    own test suite (``sys._called_from_test``) it is always disabled.
    """
    # Tests never load installed plugins by accident (datasette's sys._called_from_test).
    if getattr(sys, "_called_from_test", False):
        return True
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _load_builtins(pm: pluggy.PluginManager) -> None:
    for modname in DEFAULT_PLUGINS:
        module = importlib.import_module(modname)
        pm.register(module, name=modname)
        _infos[modname] = PluginInfo(modname, _BUILTIN, modname)


def load_entrypoints(pm: pluggy.PluginManager | None = None) -> list[str]:
    """Load third-party plugins from the ``featurescope`` entry-point group.

    This is what :meth:`pluggy.PluginManager.load_setuptools_entrypoints` does, one entry point
    at a time, so that a plugin that fails to import is named in the error. It runs on its own
    when the plugin manager is created, unless ``FEATURESCOPE_DISABLE_PLUGIN_AUTOLOAD`` is set;
    call it yourself to load entry points in spite of that switch. Entry points already loaded
    are skipped.

    Args:
        pm: the manager to load into; default the process-wide one.

    Returns:
        The names of the plugins newly loaded.

    Raises:
        PluginError: an entry point failed to import or to register, or two installed packages
            give one entry-point name; the message names the plugin and its package.
    """
    with _lock:
        pm = pm or get_plugin_manager()
        loaded = []
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            version = dist.version if dist is not None else None
            if pm.is_blocked(ep.name):
                continue
            if pm.get_plugin(ep.name) is not None:
                previous = _infos.get(ep.name)
                if previous is not None and previous.distribution == dist_name:
                    continue
                where = f"{previous.source} {previous.module}" if previous else "a plugin"
                raise PluginError(
                    f"two plugins are named {ep.name!r}: {where} and the entry point "
                    f"{ep.value} from distribution {dist_name!r}; uninstall one of them."
                )
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {ep.name!r} ({ep.value}, from distribution {dist_name!r}) failed "
                    f"to load: {type(exc).__name__}: {exc}. Fix or uninstall that package, "
                    f"or set {DISABLE_AUTOLOAD_ENV}=1 to skip third-party plugins."
                ) from exc
            pm.register(plugin, name=ep.name)
            _infos[ep.name] = PluginInfo(ep.name, "entry point", ep.value, dist_name, version)
            loaded.append(ep.name)
        return loaded


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, creating it (and loading plugins) on first use.

    If a third-party plugin fails to load, the error is raised again on every call until the
    plugin is fixed, uninstalled or ``FEATURESCOPE_DISABLE_PLUGIN_AUTOLOAD=1`` is set, rather
    than carrying on with whichever plugins happened to load before it.

    Example:
        >>> pm = get_plugin_manager()
        >>> pm.has_plugin("featurescope.visualizers.grid")
        True
    """
    global _pm
    with _lock:
        if _pm is None:
            _infos.clear()
            pm = _PluginManager("featurescope")
            pm.add_hookspecs(hookspecs)
            _load_builtins(pm)
            if not autoload_disabled():
                load_entrypoints(pm)
            _pm = pm
        return _pm


def _reset() -> None:
    """Forget the plugin manager so that the next use builds it afresh (for tests)."""
    global _pm
    with _lock:
        _pm = None
        _infos.clear()


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object (usually a module) at run time, as an entry point would.

    Its names take part in the same override and clash rules as an installed plugin's.

    Args:
        plugin: a module, class or object with ``@hookimpl`` functions.
        name: the name to list it under; default its ``__name__``.

    Returns:
        The name it was registered under.

    Raises:
        PluginError: the name is taken or blocked, or the plugin implements a hook that does
            not exist (the message suggests the closest hook name).

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
            raise PluginError(
                f"plugin {name or pm.get_canonical_name(plugin)!r} is blocked; unblock it "
                "(get_plugin_manager().unblock(name)) before registering it"
            )
        module = getattr(plugin, "__name__", type(plugin).__name__)
        _infos[registered] = PluginInfo(registered, "registered", str(module))
        return registered


def unregister_plugin(name: str) -> None:
    """Remove a plugin by name; builtins may be removed too, to replace them wholesale.

    Raises:
        PluginError: no plugin has that name.

    Example:
        >>> import types
        >>> from featurescope import hookimpl
        >>> plugin = types.SimpleNamespace(
        ...     featurescope_register_visualizers=hookimpl(lambda: {"noop_doc": print}))
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
        _infos.pop(name, None)


def list_plugins() -> list[PluginInfo]:
    """Every registered plugin, builtins first, with where it came from and the hooks it implements.

    Example:
        >>> [p.name for p in list_plugins() if p.source == "builtin"][:2]
        ['featurescope.zoo.alexnet', 'featurescope.zoo.torchvision_models']
    """
    pm = get_plugin_manager()
    order = {hook: i for i, hook in enumerate(_hook_names())}
    with _lock:
        result = []
        for name, plugin in pm.list_name_plugin():
            if plugin is None:  # blocked
                continue
            info = _infos.get(name) or PluginInfo(
                name, "registered", str(getattr(plugin, "__name__", name))
            )
            callers = pm.get_hookcallers(plugin) or []
            hooks = sorted({c.name for c in callers}, key=lambda h: order.get(h, len(order)))
            result.append(
                PluginInfo(
                    info.name,
                    info.source,
                    info.module,
                    info.distribution,
                    info.version,
                    tuple(hooks),
                )
            )
        return result


def _is_builtin(plugin_name: str) -> bool:
    info = _infos.get(plugin_name)
    return info is not None and info.source == _BUILTIN


def _call_registry_impl(impl: Any, hook_name: str, kind: str) -> Mapping[Any, Any] | None:
    try:
        result = impl.function()
    except PluginError:
        raise
    except Exception as exc:  # only reached for a manager that bypassed _PluginManager
        raise PluginError(
            f"plugin {impl.plugin_name!r} raised {type(exc).__name__} in {hook_name}: {exc}"
        ) from exc
    if result is None:
        return None
    if not isinstance(result, Mapping):
        raise PluginError(
            f"plugin {impl.plugin_name!r}: {hook_name} must return a dict of {{name: {kind}}}, "
            f"got {type(result).__name__}"
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
    provides: dict[str, list[str]] = {}
    for kind, hook_name in REGISTRY_HOOKS.items():
        names: list[str] = []
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin_name == name and not (impl.hookwrapper or impl.wrapper):
                names.extend(str(n) for n in _call_registry_impl(impl, hook_name, kind) or {})
        provides[kind] = sorted(names)
    return provides


T = TypeVar("T")


def call_registry_hook(
    hook_name: str, kind: str, convert: Callable[[str, Any, str], T] | None = None
) -> dict[str, tuple[T, str]]:
    """Call a ``{name: thing}`` hook on every plugin and merge the results.

    Each plugin is called on its own, so an exception is re-raised naming the plugin. Builtins
    are merged first, whatever their ``tryfirst``/``trylast`` marks; a non-builtin plugin may
    override a builtin name, but two plugins of the same standing (two builtins, or two
    third-party plugins) that give one name raise :class:`PluginError` naming both. Wrappers
    (``hookwrapper=True``/``wrapper=True``) are not called: a registry has nothing to wrap.

    Args:
        hook_name: e.g. ``"featurescope_register_models"``.
        kind: what the names are, for messages (``"model"``, ``"visualizer"``).
        convert: optional ``convert(name, value, plugin_name)`` applied to each entry.

    Returns:
        ``{name: (value, plugin_name)}``.

    Example:
        >>> merged = call_registry_hook("featurescope_register_visualizers", "visualizer")
        >>> merged["grid"][1]
        'featurescope.visualizers.grid'
    """
    pm = get_plugin_manager()
    hook = getattr(pm.hook, hook_name)
    impls = [i for i in hook.get_hookimpls() if not (i.hookwrapper or i.wrapper)]
    with _lock:
        builtin = {i.plugin_name for i in impls if _is_builtin(i.plugin_name)}
    # get_hookimpls() lists registration order, moved about by tryfirst/trylast; a stable sort
    # puts builtins first so that overriding never depends on those marks.
    impls.sort(key=lambda i: i.plugin_name not in builtin)
    merged: dict[str, tuple[T, str]] = {}
    for impl in impls:
        plugin_name = impl.plugin_name
        result = _call_registry_impl(impl, hook_name, kind)
        for name, value in (result or {}).items():
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
