"""Looking at a model without changing it: buffers, attributes and modes restored afterwards.

Tracing a model in training mode runs code such as timm's ``BatchNormAct2d``, which bumps
``num_batches_tracked`` on the real buffer, and torch.fx stores each tensor constant it meets as
a ``_tensor_constantN`` attribute of the model. Listing nodes or building a tap must leave the
user's model as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
        ...     _ = bn(torch.randn(4, 2)); bn.eval(); bn.note = 1
        >>> int(bn.num_batches_tracked), bn.training, hasattr(bn, "note")
        (0, True, False)
    """
    flags = [(m, m.training) for m in model.modules()]
    attributes = [(m, set(vars(m))) for m in model.modules()]
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
        for module, names in attributes:
            for name in [n for n in vars(module) if n not in names]:
                value = vars(module).pop(name)
                if module is model and added is not None:
                    added[name] = value
