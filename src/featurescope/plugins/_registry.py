"""One generic registry of named things given by plugins: models, visualizers, anything next.

A :class:`Registry` merges the ``{name: thing}`` mappings that plugins return from one hook,
built once and rebuilt only after a plugin is registered or unregistered (the way torchvision
keeps ``BUILTIN_MODELS`` and timm its ``_model_entrypoints``, but fed by pluggy). pluggy calls the
hook; :meth:`pluggy.HookCaller.get_hookimpls` (whose reverse order pluggy calls in) credits each
result to its plugin, and an exception to the plugin whose implementation is on its traceback.
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
    third-party plugins) giving one name is a :class:`~featurescope.errors.PluginError` naming both.
    Entries added in code (``extra``, e.g. the ``@register_model`` decorator's) come last and
    override everything.

    Args:
        hook_name: the hook, e.g. ``"featurescope_register_models"``.
        kind: what the names are, for messages (``"model"``).
        convert: ``convert(name, value, plugin) -> T`` checks and converts one entry.
        extra: returns entries added outside plugins, as ``{name: (value, source)}``.
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
        extra: Callable[[], Mapping[str, tuple[T, str]]] | None = None,
        lister: str = "",
    ) -> None:
        self.hook_name = hook_name
        self.kind = kind
        self._convert = convert
        self._extra = extra
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

    def provided_by(self, plugin: str) -> list[str]:
        """The names one plugin gives, sorted, whether or not another plugin overrides them.

        Asks that plugin alone, so that it answers even while another plugin's hook is broken
        (``featurescope plugins`` lists every plugin and names the broken one).
        """
        pm = _manager.get_plugin_manager()
        hook = getattr(pm.hook, self.hook_name)
        names: list[str] = []
        for impl in hook.get_hookimpls():
            if impl.plugin_name != plugin or impl.hookwrapper or impl.wrapper:
                continue
            try:
                result = impl.function()
            except (Exception, SystemExit) as exc:
                raise _raised(plugin, self.hook_name, exc) from exc
            if result is not None and not isinstance(result, Mapping):
                raise PluginError(
                    f"plugin {plugin!r}: {self.hook_name} must return a dict of "
                    f"{{name: {self.kind}}}, got {type(result).__name__}"
                )
            names.extend(str(name) for name in result or {})
        return sorted(names)

    def invalidate(self) -> None:
        """Rebuild on next use (after entries were added in code)."""
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

    def _results(self, pm: pluggy.PluginManager) -> list[tuple[str, Mapping[Any, Any]]]:
        """``(plugin, mapping)`` per implementation, builtins first, from one call by pluggy."""
        hook = getattr(pm.hook, self.hook_name)
        impls = [i for i in hook.get_hookimpls() if not (i.hookwrapper or i.wrapper)]
        try:
            results = hook()
        except PluginError:
            raise
        except (Exception, SystemExit) as exc:
            culprit = _manager.culprit(hook, exc.__traceback__) or "?"
            raise _raised(culprit, self.hook_name, exc) from exc
        if len(results) != len(impls):
            # pluggy drops None results, and with them the order that names each result.
            raise PluginError(
                f"a plugin's {self.hook_name} returned None; a registry hook must return a dict "
                f"({{}} to add nothing). It is one of: {', '.join(i.plugin_name for i in impls)}"
            )
        # pluggy calls the implementations in the reverse of get_hookimpls()'s order.
        pairs = [(i.plugin_name, r) for i, r in zip(reversed(impls), results, strict=True)]
        for plugin, result in pairs:
            if not isinstance(result, Mapping):
                raise PluginError(
                    f"plugin {plugin!r}: {self.hook_name} must return a dict of "
                    f"{{name: {self.kind}}}, got {type(result).__name__}"
                )
        # Registration order, moved about by tryfirst/trylast, must not decide overriding:
        # a stable sort puts builtins first.
        pairs.reverse()
        pairs.sort(key=lambda pair: not _manager.is_builtin(pm, pair[0]))
        return pairs

    def _build(self, pm: pluggy.PluginManager) -> dict[str, Entry[T]]:
        merged: dict[str, Entry[T]] = {}
        overrides: list[tuple[str, str, str]] = []  # said once the merge has succeeded
        for plugin, result in self._results(pm):
            builtin = _manager.is_builtin(pm, plugin)
            for name, value in result.items():
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
        for name, (value, source) in (self._extra() if self._extra else {}).items():
            merged[name] = Entry(name, value, source)
        return merged


def _raised(plugin: str, hook_name: str, exc: BaseException) -> PluginError:
    return _manager.plugin_raised(plugin, hook_name, exc)
