"""Looking at a model without changing it: buffers, attributes and modes restored afterwards.

Tracing a model in training mode runs code such as timm's ``BatchNormAct2d``, which bumps
``num_batches_tracked`` on the real buffer, and torch.fx stores each tensor constant it meets as
a ``_tensor_constantN`` attribute of the model. Listing nodes or building a tap must leave the
user's model as it was.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["untouched"]


def _saved_buffers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    saved = []
    for buffer in model.buffers():
        try:
            saved.append((buffer, buffer.detach().clone()))
        except (RuntimeError, NotImplementedError, ValueError):  # lazy or storage-less buffers
            continue
    return saved


@contextlib.contextmanager
def untouched(model: nn.Module, added: dict[str, object] | None = None) -> Iterator[None]:
    """Undo, on exit, what the block did to ``model``'s buffers, attributes and modes.

    Args:
        model: the model.
        added: if given, receives the attributes the block set on the model itself (torch.fx's
            tensor constants), which are removed from the model.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> with untouched(bn):
        ...     _ = bn(torch.randn(4, 2)); _ = bn.eval(); bn.note = 1
        >>> int(bn.num_batches_tracked), bn.training, hasattr(bn, "note")
        (0, True, False)
    """
    flags = [(m, m.training) for m in model.modules()]
    attributes = [(m, dict(vars(m)), _contents(vars(m))) for m in model.modules()]
    buffers = _saved_buffers(model)
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in buffers:
                if not torch.equal(buffer, value):
                    buffer.copy_(value)
        for module, flag in flags:
            module.training = flag
        for module, saved, contents in attributes:
            _restore(module, saved, contents, added if module is model else None)


def _contents(attributes: dict[str, Any]) -> dict[str, Any]:
    # Shallow copies of the containers a forward may fill in place (LeViT's attention-bias
    # cache holds a tensor per device, and during a trace a Proxy of that trace's graph).
    return {k: copy.copy(v) for k, v in attributes.items() if type(v) in (dict, list, set)}


def _restore(
    module: nn.Module,
    saved: dict[str, Any],
    contents: dict[str, Any],
    added: dict[str, object] | None,
) -> None:
    current = vars(module)
    for name in [n for n in current if n not in saved]:
        value = current.pop(name)
        if added is not None:
            added[name] = value
    for name, value in saved.items():
        current[name] = value  # rebound during the block: the original object comes back
        if name in contents and not _same_items(value, contents[name]):
            value.clear()
            if isinstance(value, list):
                value.extend(contents[name])
            else:
                value.update(contents[name])


def _same_items(value: Any, saved: Any) -> bool:
    if len(value) != len(saved):
        return False
    if isinstance(value, dict):
        return all(k in saved and value[k] is saved[k] for k in value)
    if isinstance(value, set):
        return bool(value == saved)
    return all(a is b for a, b in zip(value, saved, strict=True))
