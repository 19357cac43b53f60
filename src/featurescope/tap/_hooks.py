"""The forward-hook backend of FeatureTap, for models torch.fx cannot trace.

A forward hook on each requested module keeps the module's output (its first call's). Two things
make this right and cheap where plain hooks are not:

* **In-place safety.** While the model runs, a :class:`~torch.overrides.TorchFunctionMode` sees
  every torch call before it executes. When a call is about to write in place (a ``*_`` method,
  ``inplace=True``, ``x += y``, ``x[i] = y``, ``out=``) into the storage of an output already kept,
  that output is cloned first. Only those outputs are copied. (Tensor version counters would
  tell *that* a tensor changed, but only afterwards, and inference tensors have none.)
* **Early stop.** Once every requested module has run, the hook raises a private exception that
  unwinds the rest of the forward, so tapping ``conv1`` does not run the classifier.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from featurescope.errors import FeaturescopeError, NodeNotFoundError, did_you_mean
from featurescope.tap._containers import map_tensors, tensors_in
from featurescope.tap._inplace import mutated_args

__all__ = ["HookProgram"]


class _StopForward(BaseException):
    """Unwinds the model's forward once every tap has fired.

    A ``BaseException`` so that a model's own ``except Exception`` cannot swallow it.
    """


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
        return None


class _InplaceGuard(TorchFunctionMode):
    """Clones a kept output's tensors just before an in-place op writes into their storage.

    A kept output may be a container (an LSTM's ``(out, (h, c))``, a named tuple, a dict): each
    tensor in it is watched, and the one written into is replaced by its copy in a rebuilt
    container of the same type.
    """

    def __init__(self, results: dict[str, Any]) -> None:
        super().__init__()
        self.results = results
        #: ``{storage: aliases whose kept output holds a tensor on it}``
        self.pending: dict[int, set[str]] = {}

    def watch(self, alias: str, value: Any) -> None:
        for tensor in tensors_in(value):
            key = _storage_key(tensor)
            if key:
                self.pending.setdefault(key, set()).add(alias)

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self.pending:
            for target in mutated_args(func, args, kwargs):
                if isinstance(target, torch.Tensor):
                    self._protect(target)
        return func(*args, **kwargs)

    def _protect(self, target: torch.Tensor) -> None:
        key = _storage_key(target)
        if key is None or key not in self.pending:
            return

        def copy_if_written(t: torch.Tensor) -> torch.Tensor:
            return t.clone() if _storage_key(t) == key else t

        for alias in self.pending.pop(key):
            self.results[alias] = map_tensors(copy_if_written, self.results[alias])


class HookProgram:
    """Runs a model with forward hooks on the requested modules and returns their outputs.

    Args:
        model: the model.
        return_nodes: ``{module name: alias}``; names as in ``model.named_modules()``.
        fx_names: returns the model's fx node names (``None`` if it cannot be traced); called
            only to tell "not a module" apart from "no such name" in an error.

    Raises:
        NodeNotFoundError: a name is not a submodule of the model.
        FeaturescopeError: the same module is requested twice.
    """

    def __init__(
        self,
        model: nn.Module,
        return_nodes: Mapping[str, str],
        fx_names: Callable[[], Sequence[str] | None] | None = None,
    ) -> None:
        modules = {name: m for name, m in model.named_modules() if name}
        self.targets: dict[str, tuple[str, nn.Module]] = {}
        seen: dict[int, str] = {}
        for query, alias in return_nodes.items():
            if query not in modules:
                raise self._not_a_module(query, model, list(modules), fx_names)
            module = modules[query]
            if id(module) in seen:
                raise FeaturescopeError(
                    f"return_nodes asks for module {query!r} twice (it is also "
                    f"{seen[id(module)]!r}); request each module once."
                )
            seen[id(module)] = query
            self.targets[alias] = (query, module)
        self.nodes = {alias: name for alias, (name, _) in self.targets.items()}
        self.ops = {alias: type(m).__name__ for alias, (_, m) in self.targets.items()}
        #: Copies are decided while the model runs, so none is known beforehand.
        self.copied: list[str] = []
        #: torch.export cannot capture hooks registered during the forward, a
        #: TorchFunctionMode and the early stop.
        self.export_blocker: str | None = (
            "the hooks backend registers forward hooks during the forward, watches in-place "
            "writes with a TorchFunctionMode and stops the forward early with an exception, "
            "none of which torch.export can capture"
        )

    @staticmethod
    def _not_a_module(
        query: str,
        model: nn.Module,
        modules: list[str],
        fx_names: Callable[[], Sequence[str] | None] | None,
    ) -> NodeNotFoundError:
        kind = type(model).__name__
        names = fx_names() if fx_names is not None else None
        if names is not None and query in names:
            return NodeNotFoundError(
                f"node {query!r} of {kind} is an operation, not a module: the hooks backend can "
                "only tap modules (forward hooks). Use backend='fx' for it, or one of the module "
                f"names.{did_you_mean(query, modules)}"
            )
        return NodeNotFoundError(
            f"{query!r} is not a module of {kind}; the hooks backend taps modules by their "
            f"model.named_modules() name.{did_you_mean(query, modules)} "
            "List every name with [n for n, _ in model.named_modules()]."
        )

    def __call__(self, model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        results: dict[str, Any] = {}
        guard = _InplaceGuard(results)
        remaining = set(self.targets)

        def make_hook(alias: str) -> Callable[..., None]:
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                if alias in results:
                    return  # a module called twice: its first call is the tapped one
                results[alias] = output
                guard.watch(alias, output)
                remaining.discard(alias)
                if not remaining:
                    raise _StopForward

            return hook

        handles = [m.register_forward_hook(make_hook(a)) for a, (_, m) in self.targets.items()]
        try:
            with guard:
                model(*args, **kwargs)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if remaining:
            missing = ", ".join(repr(self.targets[a][0]) for a in sorted(remaining))
            raise FeaturescopeError(
                f"module(s) {missing} did not run in this forward of {type(model).__name__}, so "
                "there is nothing to return for them; check the model's control flow."
            )
        return {alias: results[alias] for alias in self.targets}
