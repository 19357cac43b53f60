"""One generic registry of named things given by plugins: models, visualizers, anything next.

A :class:`Registry` merges the ``{name: thing}`` mappings that plugins return from one hook,
built once and rebuilt only after a plugin is registered or unregistered (the way torchvision
keeps ``BUILTIN_MODELS`` and timm its ``_model_entrypoints``, but fed by pluggy). pluggy says
which plugins implement the hook (:meth:`~pluggy.HookCaller.get_hookimpls`) and calls each of
them alone (:meth:`~pluggy.PluginManager.subset_hook_caller`), so every result, and every
exception, belongs to the plugin that was asked.
"""

from __future__ import annotations

import fnmatch
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pluggy

from featurescope.errors import (
    PluginError,
    PluginOverrideWarning,
    UnknownNameError,
    did_you_mean,
)
from featurescope.plugins import _manager

T = TypeVar("T")

# The overrides already warned of, per plugin manager: said once, however often a registry is
# rebuilt; a new manager (after plugins._reset()) says them again.
_WARNED: weakref.WeakKeyDictionary[pluggy.PluginManager, set[tuple[str, str, str]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered thing and the plugin that gave it.

    Example:
        >>> from featurescope.plugins import Registry
        >>> views = Registry("featurescope_register_visualizers", "visualizer", lambda n, v, p: v)
        >>> views.get("grid").plugin
        'featurescope.visualizers.grid'
    """

    name: str
    value: T
    plugin: str


class Registry(Generic[T]):
    """The merged ``{name: thing}`` of one registry hook, with fnmatch listing and close matches.

    Merge rules: builtins first, whatever their ``tryfirst``/``trylast`` marks; a third-party
    plugin may override a builtin's name; two plugins of the same standing (two builtins, or two
    third-party plugins) giving one name is a :class:`~featurescope.PluginError` naming both.

    Args:
        hook_name: the hook, e.g. ``"featurescope_register_models"``.
        kind: what the names are, for messages (``"model"``).
        convert: ``convert(name, value, plugin) -> T`` checks and converts one entry.
        lister: the public function that lists the names, for messages.

    Example:
        >>> models = Registry("featurescope_register_models", "model", lambda n, v, p: v)
        >>> models.names("alexnet*")
        ['alexnet', 'alexnet_half']
        >>> models.get("alexnett")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        featurescope.errors.UnknownNameError: unknown model 'alexnett'. Did you mean: 'alexnet', ...
    """

    def __init__(
        self,
        hook_name: str,
        kind: str,
        convert: Callable[[str, Any, str], T],
        *,
        lister: str = "",
    ) -> None:
        self.hook_name = hook_name
        self.kind = kind
        self._convert = convert
        self._lister = lister
        self._lock = threading.RLock()
        self._built: tuple[int, dict[str, Entry[T]]] | None = None

    def entries(self) -> dict[str, Entry[T]]:
        """Every entry by name, built on first use after the plugins last changed."""
        with self._lock:
            pm = _manager.get_plugin_manager()
            now = _manager.generation()
            if self._built is None or self._built[0] != now:
                self._built = (now, self._build(pm))
            return self._built[1]

    def names(self, pattern: str | None = None) -> list[str]:
        """The names, sorted, optionally filtered by a shell-style pattern (``"resnet*"``)."""
        names = sorted(self.entries())
        if pattern is not None:
            names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        return names

    def get(self, name: str) -> Entry[T]:
        """The entry called ``name``.

        Raises:
            UnknownNameError: no such name; the message names the closest ones.
        """
        entries = self.entries()
        try:
            return entries[name]
        except KeyError:
            shown = sorted(entries)
            listing = ", ".join(shown[:20]) + (
                f", ... ({len(shown)} in all)" if len(shown) > 20 else ""
            )
            where = f" ({self._lister})" if self._lister else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{did_you_mean(name, entries)} "
                f"Known {self.kind}s: {listing}{where}."
            ) from None

    def invalidate(self) -> None:
        """Rebuild on next use (after something a plugin reads, such as an installed package, changed)."""
        with self._lock:
            self._built = None

    # -- building ------------------------------------------------------------------------------

    def _warn_override(
        self, pm: pluggy.PluginManager, name: str, builtin: str, plugin: str
    ) -> None:
        warned = _WARNED.setdefault(pm, set())
        if (self.kind, name, plugin) in warned:
            return
        warned.add((self.kind, name, plugin))
        warnings.warn(
            f"plugin {plugin!r} replaces the builtin {self.kind} {name!r} (of {builtin!r}): "
            f"{name!r} now means the plugin's. Unregister or uninstall the plugin to get the "
            "builtin back",
            PluginOverrideWarning,
            stacklevel=4,
        )

    def _build(self, pm: pluggy.PluginManager) -> dict[str, Entry[T]]:
        merged: dict[str, Entry[T]] = {}
        overrides: list[tuple[str, str, str]] = []  # said once the merge has succeeded
        for plugin in implementers(pm, self.hook_name):
            builtin = _manager.is_builtin(pm, plugin)
            for name, value in ask(pm, self.hook_name, plugin, self.kind).items():
                if not isinstance(name, str) or not name:
                    raise PluginError(
                        f"plugin {plugin!r}: {self.hook_name} gave a {self.kind} name {name!r}; "
                        "names must be non-empty strings"
                    )
                if name in merged:
                    previous = merged[name].plugin
                    if not (_manager.is_builtin(pm, previous) and not builtin):
                        raise PluginError(
                            f"{self.kind} {name!r} is registered by two plugins, {previous!r} "
                            f"and {plugin!r}; uninstall or unregister one of them "
                            "(featurescope.plugins.unregister_plugin) to choose"
                        )
                    overrides.append((name, previous, plugin))
                merged[name] = Entry(name, self._convert(name, value, plugin), plugin)
        for name, builtin_plugin, plugin in overrides:
            self._warn_override(pm, name, builtin_plugin, plugin)
        return merged


def implementers(pm: pluggy.PluginManager, hook_name: str) -> list[str]:
    """The plugins implementing ``hook_name``: builtins first, then in registration order.

    Registration order, not pluggy's call order: ``tryfirst``/``trylast`` marks decide when a
    plugin is called, never which plugin's name wins.
    """
    names = [
        name
        for name, plugin in pm.list_name_plugin()
        if plugin is not None and _implements(pm, plugin, hook_name)
    ]
    return sorted(names, key=lambda name: not _manager.is_builtin(pm, name))


def _implements(pm: pluggy.PluginManager, plugin: object, hook_name: str) -> bool:
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    return any(i.plugin is plugin and not (i.hookwrapper or i.wrapper) for i in impls)


def ask(pm: pluggy.PluginManager, hook_name: str, plugin: str, kind: str) -> Mapping[Any, Any]:
    """What one plugin answers to the registry hook ``hook_name``, asked alone through pluggy.

    Args:
        pm: the plugin manager.
        hook_name: a ``{name: thing}`` hook, e.g. ``"featurescope_register_models"``.
        plugin: the plugin's registered name.
        kind: what the names are, for messages (``"model"``).

    Returns:
        Its mapping; ``{}`` when it does not implement the hook.

    Raises:
        PluginError: the plugin raised, called :func:`sys.exit`, or returned something other
            than a mapping; the message names it.

    Example:
        >>> from featurescope.plugins import get_plugin_manager
        >>> sorted(ask(get_plugin_manager(), "featurescope_register_visualizers",
        ...            "featurescope.visualizers.grid", "visualizer"))
        ['grid']
    """
    me = pm.get_plugin(plugin)
    if me is None or not _implements(pm, me, hook_name):
        return {}
    others = [p for _, p in pm.list_name_plugin() if p is not None and p is not me]
    try:
        results = pm.subset_hook_caller(hook_name, remove_plugins=others)()
    except PluginError:
        raise  # already names a plugin (a hook that called featurescope, which hit another)
    except (Exception, SystemExit) as exc:  # a plugin's sys.exit() must not end the program
        raise _manager.plugin_raised(plugin, hook_name, exc) from exc
    if not results:  # pluggy drops a None result
        raise PluginError(
            f"plugin {plugin!r}: {hook_name} returned None; a registry hook must return a dict "
            "({} to add nothing)"
        )
    merged: dict[Any, Any] = {}
    for result in results:  # one per implementation (pluggy's specname allows several)
        if not isinstance(result, Mapping):
            raise PluginError(
                f"plugin {plugin!r}: {hook_name} must return a dict of {{name: {kind}}}, "
                f"got {type(result).__name__}"
            )
        merged.update(result)
    return merged
