"""Small facts about an ``nn.Module`` that several packages need: its device, dtype and modes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["model_device", "model_dtype", "training_mode", "weights_fingerprint"]


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put ``model`` in training or eval mode, then restore every submodule's own flag.

    ``model.train(was_training)`` would not do: it would flip a deliberately frozen BatchNorm of a
    model in training mode back to training.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); ``None`` for a stateless model."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return None


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype of all the model's parameters; ``None`` if none or several."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def weights_fingerprint(model: nn.Module) -> str:
    """A SHA-256 of every parameter and buffer (names, dtypes, shapes, bytes), in hex.

    Two models give the same fingerprint exactly when their state dicts are bit-identical:
    more training, another checkpoint or a changed layer all change it.
    """
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
