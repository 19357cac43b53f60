"""One :class:`pluggy.PluginManager`: builtins first, then entry points, checked as they register.

pluggy calls every hook. featurescope adds only what pluggy leaves to its host: checks when a
plugin registers (a misspelt hook, a missing marker), the names of plugins in errors
(:func:`hook_failed`, from pluggy's own :meth:`~pluggy.HookCaller.get_hookimpls`), and where each
plugin came from (builtin, an entry point with :meth:`~pluggy.PluginManager.list_plugin_distinfo`,
or a run-time registration).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pluggy

from featurescope import hookspecs
from featurescope.errors import PluginError, did_you_mean

ENTRY_POINT_GROUP = "featurescope"
DISABLE_AUTOLOAD_ENV = "FEATURESCOPE_DISABLE_PLUGIN_AUTOLOAD"

#: Builtin plugin modules, registered in this order before any third-party plugin.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "featurescope.zoo.alexnet",
    "featurescope.zoo.torchvision_models",
    "featurescope.zoo.timm_models",
    "featurescope.zoo.decorated",
    "featurescope.visualizers.grid",
    "featurescope.visualizers.sum",
    "featurescope.visualizers.overlay",
    "featurescope.visualizers.montage",
    "featurescope.visualizers.curves",
    "featurescope.visualizers.similarity",
    "featurescope.visualizers.units",
    "featurescope.study.gradcam",
)

_HOOK_PREFIX = "featurescope_"
BUILTIN = "builtin"
ENTRY_POINT = "entry point"
REGISTERED = "registered"


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

    Example:
        >>> from featurescope.plugins import list_plugins
        >>> grid = [p for p in list_plugins() if p.name == "featurescope.visualizers.grid"][0]
        >>> grid.source, grid.hooks
        ('builtin', ('featurescope_register_visualizers',))
    """

    name: str
    source: str
    module: str
    distribution: str | None = None
    version: str | None = None
    hooks: tuple[str, ...] = ()


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
#: Bumped whenever the set of plugins changes; registries rebuild when it moves.
_generation = 0


def generation() -> int:
    """A counter that changes whenever a plugin is registered or unregistered."""
    return _generation


def invalidate() -> None:
    """Tell every registry that what the plugins provide may have changed."""
    global _generation
    with _lock:
        _generation += 1


def hook_names() -> list[str]:
    """Every hook featurescope specifies, in :mod:`featurescope.hookspecs` order."""
    return [name for name in vars(hookspecs) if name.startswith(_HOOK_PREFIX)]


def _check_plugin(plugin: object, label: str) -> None:
    """Refuse, with the fix, a plugin that pluggy would accept but never call or ask alone."""
    # pluggy's subset_hook_caller, which asks one plugin alone, keeps plugins in a set.
    if type(plugin).__hash__ is None:
        raise PluginError(
            f"plugin {label!r} is a {type(plugin).__name__}, which cannot be hashed, and pluggy "
            "tells plugins apart by hash; make it a module (types.ModuleType), a class or an "
            "instance of an ordinary class"
        )
    _check_unmarked_hooks(plugin, label)


def _check_unmarked_hooks(plugin: object, label: str) -> None:
    # pluggy silently ignores an undecorated function, which leaves authors wondering why
    # their visualizer never shows up.
    for hook_name in hook_names():
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


def _register(pm: pluggy.PluginManager, plugin: object, name: str | None) -> str | None:
    """``pm.register`` with errors that say what to change, and unknown hooks refused."""
    label = name or pm.get_canonical_name(plugin)
    _check_plugin(plugin, label)
    try:
        registered = pm.register(plugin, name)
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
    _check_known_hooks(pm, plugin, registered)
    invalidate()
    return registered


def _check_known_hooks(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    """Unregister a just-registered plugin that implements a hook featurescope does not have."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        unknown = [
            c.name
            for c in pm.get_hookcallers(plugin) or []
            if not c.has_spec()
            and any(i.plugin is plugin and not i.optionalhook for i in c.get_hookimpls())
        ]
        pm.unregister(name=name)
        hint = did_you_mean(unknown[0], hook_names()) if unknown else ""
        raise PluginError(
            f"plugin {name!r} implements {', '.join(unknown) or 'a hook'}, which is not "
            f"a featurescope hook.{hint} The hooks are: {', '.join(hook_names())}."
        ) from None


def autoload_disabled() -> bool:
    """Whether third-party plugins are skipped: ``FEATURESCOPE_DISABLE_PLUGIN_AUTOLOAD`` is set.

    Any value but ``""``, ``0``, ``false`` or ``no`` disables autoloading. Inside featurescope's
    own test suite (``sys._called_from_test``) it is always disabled.

    Example:
        >>> autoload_disabled()  # doctests run inside the test suite
        True
    """
    # Tests never load installed plugins by accident (datasette's sys._called_from_test).
    if getattr(sys, "_called_from_test", False):
        return True
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _entry_points() -> Iterator[tuple[importlib.metadata.EntryPoint, Any]]:
    # The order pluggy's load_setuptools_entrypoints walks them in.
    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP:
                yield ep, dist


def _check_entry_point_names(pm: pluggy.PluginManager) -> None:
    # pluggy skips an entry point whose name is taken; two packages giving one name would
    # then depend on install order, so refuse before loading either.
    seen: dict[str, str] = {}
    loaded = {d.metadata["Name"] for _, d in pm.list_plugin_distinfo()}
    for ep, dist in _entry_points():
        owner = dist.metadata["Name"]
        if ep.name in seen and seen[ep.name] != owner:
            raise PluginError(
                f"two plugins are named {ep.name!r}: entry points from distributions "
                f"{seen[ep.name]!r} and {owner!r}; uninstall one of them."
            )
        seen[ep.name] = owner
        current = pm.get_plugin(ep.name)
        if current is not None and owner not in loaded and not pm.is_blocked(ep.name):
            raise PluginError(
                f"two plugins are named {ep.name!r}: {pm.get_canonical_name(current)!r} "
                f"already registered and the entry point {ep.value} from distribution "
                f"{owner!r}; uninstall one of them."
            )


def load_entrypoints(pm: pluggy.PluginManager | None = None) -> list[str]:
    """Load third-party plugins from the ``featurescope`` entry-point group.

    pluggy's :meth:`~pluggy.PluginManager.load_setuptools_entrypoints` does the loading; a
    plugin that fails to import is named in the error. It runs on its own when the plugin
    manager is created, unless ``FEATURESCOPE_DISABLE_PLUGIN_AUTOLOAD`` is set; call it yourself
    to load entry points in spite of that switch. Entry points already loaded are skipped.

    Args:
        pm: the manager to load into; default the process-wide one.

    Returns:
        The names of the plugins newly loaded.

    Raises:
        PluginError: an entry point failed to import or to register, or two installed packages
            give one entry-point name; the message names the plugin and its package.

    Example:
        >>> load_entrypoints()  # nothing installed in the test environment
        []
    """
    with _lock:
        pm = pm or get_plugin_manager()
        _check_entry_point_names(pm)
        before = {name for name, _ in pm.list_name_plugin()}
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except (Exception, SystemExit) as exc:  # a plugin's sys.exit() must not end the program
            culprit = next(
                ((ep, d) for ep, d in _entry_points() if pm.get_plugin(ep.name) is None), None
            )
            _forget_new(pm, before)
            if culprit is None:
                raise
            ep, dist = culprit
            what = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, SystemExit):
                what = f"it called sys.exit({exc.code!r}) while being imported"
            if isinstance(exc, PluginError):
                raise
            raise PluginError(
                f"plugin {ep.name!r} ({ep.value}, from distribution {dist.metadata['Name']!r}) "
                f"failed to load: {what}. Fix or uninstall that package, "
                f"or set {DISABLE_AUTOLOAD_ENV}=1 to skip third-party plugins."
            ) from exc
        new = [name for name, _ in pm.list_name_plugin() if name not in before]
        # pluggy registered them without featurescope's checks: run those now.
        for name in new:
            plugin = pm.get_plugin(name)
            try:
                _check_plugin(plugin, name)
                _check_known_hooks(pm, plugin, name)
            except PluginError:
                _forget_new(pm, before)
                raise
        if new:
            invalidate()
        return new


def _forget_new(pm: pluggy.PluginManager, before: set[str]) -> None:
    for name, _ in list(pm.list_name_plugin()):
        if name not in before:
            pm.unregister(name=name)


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
            pm = pluggy.PluginManager("featurescope")
            pm.add_hookspecs(hookspecs)
            for modname in DEFAULT_PLUGINS:
                _register(pm, importlib.import_module(modname), modname)
            if not autoload_disabled():
                load_entrypoints(pm)
            _pm = pm
            invalidate()
        return _pm


def reset() -> None:
    """Forget the plugin manager so that the next use builds it afresh (for tests)."""
    global _pm
    with _lock:
        _pm = None
        invalidate()


def source_of(pm: pluggy.PluginManager, name: str, plugin: object) -> PluginInfo:
    """Where the plugin registered as ``name`` came from, read from pluggy's own records."""
    module = str(getattr(plugin, "__name__", type(plugin).__name__))
    if name in DEFAULT_PLUGINS and module == name:
        return PluginInfo(name, BUILTIN, name)
    for registered, dist in pm.list_plugin_distinfo():
        if registered is plugin:
            ep = next((e for e, d in _entry_points() if e.name == name), None)
            value = ep.value if ep is not None else module
            return PluginInfo(name, ENTRY_POINT, value, dist.project_name, dist.version)
    return PluginInfo(name, REGISTERED, module)


def is_builtin(pm: pluggy.PluginManager, name: str) -> bool:
    """Whether ``name`` is one of :data:`DEFAULT_PLUGINS`, registered as itself."""
    return name in DEFAULT_PLUGINS and source_of(pm, name, pm.get_plugin(name)).source == BUILTIN


def hook_failed(hook: pluggy.HookCaller, exc: BaseException) -> PluginError:
    """The error for ``exc``, raised while pluggy called ``hook``: it names the plugin.

    pluggy calls each implementation itself and lets an exception through untouched; the
    implementation that raised is the one of ``hook.get_hookimpls()`` whose function is on the
    exception's traceback (pluggy records no more than that).

    Example:
        >>> from featurescope.plugins import get_plugin_manager
        >>> hook = get_plugin_manager().hook.featurescope_features_extracted
        >>> print(hook_failed(hook, KeyError("x")))  # doctest: +ELLIPSIS
        a plugin raised KeyError in featurescope_features_extracted: 'x'. Fix or uninstall ...
    """
    impls = {
        getattr(inspect.unwrap(i.function), "__code__", None): i.plugin_name
        for i in hook.get_hookimpls()
    }
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code not in impls:
        tb = tb.tb_next
    return plugin_raised(impls[tb.tb_frame.f_code] if tb else None, hook.name, exc)


def plugin_raised(plugin: str | None, where: str, exc: BaseException) -> PluginError:
    """The error for a plugin that raised (or called :func:`sys.exit`) in ``where``.

    Example:
        >>> print(plugin_raised("acme", "its model builder", SystemExit(0)))  # doctest: +ELLIPSIS
        plugin 'acme' called sys.exit(0) in its model builder. Fix or uninstall that plugin, ...
    """
    what = (
        f"called sys.exit({exc.code!r})"
        if isinstance(exc, SystemExit)
        else f"raised {type(exc).__name__}"
    )
    detail = "" if isinstance(exc, SystemExit) else f": {exc}"
    if plugin is None:
        return PluginError(f"a plugin {what} in {where}{detail}. Fix or uninstall that plugin.")
    return PluginError(
        f"plugin {plugin!r} {what} in {where}{detail}. Fix or uninstall that plugin, or remove "
        f"it for this process with featurescope.plugins.unregister_plugin({plugin!r})."
    )
