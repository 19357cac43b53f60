"""Small facts about an ``nn.Module`` that several packages need: its device, dtype and modes,
and whether a device asked for is there."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from featurescope.errors import FeaturescopeError

__all__ = [
    "model_device",
    "model_dtype",
    "resolve_device",
    "training_mode",
    "weights_fingerprint",
]


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


def _accelerator_count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    if kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        return xpu.device_count() if xpu is not None and xpu.is_available() else 0
    return -1  # a device type featurescope does not check: torch says when it is used


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device ``device`` names, checked to exist here; ``None`` is CUDA when available.

    Checked once where a user names it (the command line's ``--device``), so that a missing
    GPU is one sentence instead of a traceback from deep inside the first ``.to(device)``.

    Raises:
        FeaturescopeError: not a device name, or no such device on this machine.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> try:
        ...     resolve_device("gpu")
        ... except FeaturescopeError as err:
        ...     print(str(err).split(";")[0])
        'gpu' is not a device
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise FeaturescopeError(
            f"{str(device)!r} is not a device; use cpu, cuda, cuda:1, mps, ..."
        ) from exc
    count = _accelerator_count(resolved.type)
    if count == 0:
        raise FeaturescopeError(
            f"device {str(device)!r} is not available: torch sees no {resolved.type} device on "
            "this machine; use 'cpu' (or name no device: CUDA when available)"
        )
    if resolved.index is not None and 0 <= count <= resolved.index:
        raise FeaturescopeError(
            f"device {str(device)!r} does not exist: this machine has {count} {resolved.type} "
            f"device(s), {resolved.type}:0 to {resolved.type}:{count - 1}"
        )
    return resolved
