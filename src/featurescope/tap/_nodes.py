"""The nodes a tap can return: exactly what ``FeatureTap(model, ...)`` accepts and runs.

``FeatureTap(model, tappable_nodes(model))`` must work: a shared node list has to resolve in both
modes' graphs (a node of an eval-only branch, as in timm's LeViT, would be refused), and the hooks
backend refuses a module that never runs in the forward (a ViT's ``attn_drop`` where attention
is fused). So the list is the current mode's graph nodes that the other mode's graph has too, or,
for the hooks backend, the leaf modules seen running in one forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from featurescope._torch_utils import model_device, model_dtype
from featurescope.errors import FeaturescopeError
from featurescope.tap._containers import map_tensors
from featurescope.tap._tap import _zoo_input_size
from featurescope.tap._trace import trace
from featurescope.tap._untouched import untouched

__all__ = ["tappable_nodes"]

Backend = Literal["auto", "fx", "hooks"]
_BACKENDS = ("auto", "fx", "hooks")


def tappable_nodes(
    model: nn.Module,
    backend: Backend = "auto",
    example_inputs: Sequence[Any] | None = None,
) -> list[str]:
    """Every layer ``FeatureTap(model, nodes, backend=backend)`` accepts and runs, in order.

    For the model's current mode (``model.training``): with torch.fx, the graph's nodes that the
    other mode's graph has too (so one list serves both, as ``return_nodes`` must), the model's
    inputs left out as torchsummary leaves them out; with hooks (``"hooks"``, or ``"auto"`` for a
    model torch.fx cannot trace), the leaf modules that run in one forward. The model itself is
    left as it was: buffers, attributes, modes and the random number generator.

    Args:
        model: the model.
        backend: ``"auto"``, ``"fx"`` or ``"hooks"``, as for :class:`FeatureTap`.
        example_inputs: the forward's positional inputs, to find the modules that run (hooks
            only). Default: a random batch of two at the model's input size, where the zoo's
            metadata or timm's ``pretrained_cfg`` gives one; else every leaf module is listed.

    Returns:
        Node names (fx) or module names (hooks), in execution order for fx and in
        ``named_modules()`` order for hooks.

    Raises:
        FeaturescopeError: ``backend`` is unknown, or is ``"fx"`` and torch.fx cannot trace the
            model.

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> tappable_nodes(net), tappable_nodes(net, "hooks")
        (['0', '1'], ['0', '1'])
    """
    if backend not in _BACKENDS:
        raise FeaturescopeError(f"backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    if backend != "hooks":
        try:
            current, other = (trace(model, mode) for mode in (model.training, not model.training))
        except Exception as exc:
            if backend == "fx":
                raise FeaturescopeError(
                    f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
                    "tappable_nodes(model, 'hooks') lists the modules the hooks backend taps."
                ) from exc
        else:
            inputs = set(inspect.signature(model.forward).parameters)
            return [n for n in current.names if n not in inputs and other.has(n)]
    return _modules_that_run(model, example_inputs)


def _modules_that_run(model: nn.Module, example_inputs: Sequence[Any] | None) -> list[str]:
    leaves = [n for n, m in model.named_modules() if n and next(m.children(), None) is None]
    # A copy: the forward may write into its inputs in place.
    inputs = (
        map_tensors(torch.Tensor.clone, tuple(example_inputs))
        if example_inputs is not None
        else _random_inputs(model)
    )
    if inputs is None:
        return leaves
    ran: set[str] = set()
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda *_, name=n: ran.add(name)) for n in leaves]
    try:
        with untouched(model), torch.random.fork_rng(devices=_cuda_devices(model)), torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [n for n in leaves if n in ran]


def _random_inputs(model: nn.Module) -> tuple[torch.Tensor] | None:
    size = _zoo_input_size(model)
    cfg = getattr(model, "pretrained_cfg", None)
    if size is None and isinstance(cfg, dict) and cfg.get("input_size"):
        size = tuple(int(d) for d in cfg["input_size"])
    if size is None:
        return None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *size, generator=generator, dtype=model_dtype(model) or torch.float32)
    return (x.to(model_device(model) or torch.device("cpu")),)


def _cuda_devices(model: nn.Module) -> list[int]:
    device = model_device(model)
    if device is None or device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
