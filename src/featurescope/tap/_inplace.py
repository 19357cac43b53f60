"""Which calls overwrite their inputs in place: shared by both backends of FeatureTap.

A tapped tensor is only safe to hand back if nothing that runs after it writes into its storage.
Both backends ask the same question of every later call, "which of your arguments do you
mutate?", and copy a tapped tensor only when the answer names storage it shares.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

__all__ = ["mutated_args", "mutates_first_arg"]

#: ``x += y`` and ``x[i] = y`` as torch.fx records them (``operator.iadd``, ``operator.setitem``).
_INPLACE_OPERATORS: frozenset[Callable[..., Any]] = frozenset(
    {
        operator.setitem,
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.iand,
        operator.ior,
        operator.ixor,
        operator.ilshift,
        operator.irshift,
        operator.imatmul,
    }
)
#: The same as Tensor methods, as a TorchFunctionMode or a ``call_method`` node sees them.
_INPLACE_DUNDERS = frozenset(
    {
        "__setitem__",
        "__iadd__",
        "__isub__",
        "__imul__",
        "__itruediv__",
        "__ifloordiv__",
        "__imod__",
        "__ipow__",
        "__iand__",
        "__ior__",
        "__ixor__",
        "__ilshift__",
        "__irshift__",
        "__imatmul__",
    }
)

# Position of an ``inplace`` parameter per callable (None: it has none); signatures are slow.
_INPLACE_POSITION: dict[Any, int | None] = {}


def mutates_first_arg(name: str) -> bool:
    """Whether a call named ``name`` writes into its first argument by naming convention.

    PyTorch names in-place variants with a trailing underscore (``relu_``, ``add_``,
    ``copy_``); private names (``_foo_``) do not follow it.

    Example:
        >>> mutates_first_arg("relu_"), mutates_first_arg("relu"), mutates_first_arg("__iadd__")
        (True, False, True)
    """
    if name in _INPLACE_DUNDERS:
        return True
    return name.endswith("_") and not name.startswith("_")


def _inplace_position(func: Callable[..., Any]) -> int | None:
    try:
        return _INPLACE_POSITION[func]
    except KeyError:
        pass
    except TypeError:  # unhashable callable
        return None
    position: int | None = None
    try:
        params = list(inspect.signature(func).parameters)
        position = params.index("inplace") if "inplace" in params else None
    except (TypeError, ValueError):
        position = None
    _INPLACE_POSITION[func] = position
    return position


def _inplace_flag(func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    # nn.Dropout calls F.dropout(x, p, training, inplace) positionally; nn.ReLU uses a keyword.
    if "inplace" in kwargs:
        return bool(kwargs["inplace"])
    position = _inplace_position(func)
    return position is not None and len(args) > position and args[position] is True


def _is_inplace_operator(target: Callable[..., Any]) -> bool:
    try:
        return target in _INPLACE_OPERATORS
    except TypeError:  # unhashable callable
        return False


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _flatten(v)
    else:
        yield value


def mutated_args(
    target: Callable[..., Any] | str, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> list[Any]:
    """The arguments a call writes into: its first for in-place ops, and any ``out=``.

    Args:
        target: the callable (a function, a ``Tensor`` method, an ``operator`` function), or a
            method name as in an fx ``call_method`` node (where ``args[0]`` is ``self``).
        args: the positional arguments, ``self`` first for methods.
        kwargs: the keyword arguments.

    Returns:
        The mutated arguments, possibly empty; callers check which of them are tensors.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> x = torch.ones(2)
        >>> mutated_args(F.relu, (x,), {"inplace": True})[0] is x
        True
        >>> mutated_args("add_", (x, 1), {})[0] is x, mutated_args(torch.add, (x, 1), {})
        (True, [])
    """
    mutated: list[Any] = []
    if args:
        if isinstance(target, str):
            first = mutates_first_arg(target)
        else:
            first = (
                _is_inplace_operator(target)
                or mutates_first_arg(getattr(target, "__name__", ""))
                or _inplace_flag(target, args, kwargs)
            )
        if first:
            mutated.append(args[0])
    out = kwargs.get("out")
    if out is not None:
        mutated.extend(_flatten(out))
    return mutated
