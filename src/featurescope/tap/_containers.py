"""The tensors inside a node's output, whatever container holds them: shared by both backends.

A layer may return a tuple, a list, a dict, a named tuple or a ``torch.return_types`` value
(``torch.max(x, 1)``). A tapped output is copied or guarded tensor by tensor, and what comes
back keeps the container's own type, so ``.values`` and ``out["key"]`` still work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["map_tensors", "tensors_in"]


def _is_structseq(value: Any) -> bool:
    # torch.return_types.* are C struct sequences: tuples with n_fields, not named tuples.
    return isinstance(value, tuple) and hasattr(type(value), "n_fields")


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor in it, containers rebuilt as their own type.

    Example:
        >>> import collections, torch
        >>> Pair = collections.namedtuple("Pair", "a b")
        >>> out = map_tensors(lambda t: t * 2, {"p": Pair(torch.ones(1), 3), "m": torch.max(torch.ones(2, 2), 1)})
        >>> out["p"], type(out["m"]).__name__, out["m"].values
        (Pair(a=tensor([2.]), b=3), 'max', tensor([2., 2.]))
    """
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        items = [map_tensors(fn, v) for v in value]
        if hasattr(value, "_fields"):
            return type(value)(*items)
        if _is_structseq(value):
            return type(value)(items)
        return tuple(items)
    if isinstance(value, list):
        return [map_tensors(fn, v) for v in value]
    if isinstance(value, dict):
        rebuilt = {k: map_tensors(fn, v) for k, v in value.items()}
        if type(value) is dict:
            return rebuilt
        try:
            copy = value.copy()  # OrderedDict, defaultdict, ...: same type, same extras
            copy.update(rebuilt)
            return copy
        except (AttributeError, TypeError):
            return rebuilt
    return value


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) output, in order.

    Example:
        >>> import torch
        >>> [t.item() for t in tensors_in((torch.tensor(1), [torch.tensor(2)], {"k": torch.tensor(3)}))]
        [1, 2, 3]
    """
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v)
