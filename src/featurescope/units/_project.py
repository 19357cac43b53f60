"""Deconvnet and guided-backprop projections of one activation back to the input's pixels.

Zeiler & Fergus's deconvnet sends one activation (every other zeroed) back down the network:
transposed convolutions are the gradient's, max-pooling is undone through the forward pass's
switches (the gradient of max-pooling routes to the argmax), and each ReLU is applied to the
top-down signal instead of being gated by the forward one. Guided backpropagation
(Springenberg et al., 2015) does both: the forward gate and a ReLU on the signal.

Only ReLU's backward changes, so it is swapped for the length of one forward pass by a torch
function mode: ``nn.ReLU`` (in place or not), ``F.relu``, ``torch.relu`` and ``Tensor.relu_``
all reach it, and the model is neither copied nor modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from featurescope._torch_utils import training_mode
from featurescope.errors import FeaturescopeError
from featurescope.tap import FeatureTap
from featurescope.units._top import as_grid

__all__ = ["project", "projections"]

Method = Literal["deconvnet", "guided", "gradient"]


class _DeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp_min(0)


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        result: torch.Tensor = grad.clamp_min(0) * (out > 0)
        return result


_RELUS = frozenset({"relu", "relu_"})


class _SwapReLU(TorchFunctionMode):
    """Every ReLU run under this mode goes through ``function`` (out of place, so that the
    forward values a later in-place ReLU would overwrite stay for the backward)."""

    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in _RELUS and args and isinstance(args[0], torch.Tensor):
            return self.function.apply(args[0])
        return func(*args, **(kwargs or {}))


def project(
    model: nn.Module,
    image: torch.Tensor,
    node: str,
    channel: int,
    position: tuple[int, int] = (0, 0),
    *,
    method: Method = "deconvnet",
) -> torch.Tensor:
    """One activation of ``node`` projected back to the input, Zeiler & Fergus's way.

    The activation at ``(channel, *position)`` (on the node's grid, as
    :func:`~featurescope.units.top_activations` gives it) is sent back alone with a unit signal, as
    Captum's ``Deconvolution`` and ``GuidedBackprop`` do; both are positively homogeneous, so
    a positive activation's own value would only scale the result.

    Args:
        model: any model :class:`~featurescope.FeatureTap` runs; it is run in eval mode.
        image: one input ``[C, H, W]`` (preprocessed as the model takes it).
        node: the node, as :class:`~featurescope.FeatureTap` names it.
        channel: the channel.
        position: ``(row, column)`` on the node's grid.
        method: ``"deconvnet"`` (ReLUs on the top-down signal), ``"guided"`` (guided
            backpropagation: both gates) or ``"gradient"`` (the plain gradient).

    Returns:
        ``[C, H, W]``: the projection, in the input's units.

    Raises:
        FeaturescopeError: an unknown method or a position off the node's grid.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3), torch.nn.ReLU(inplace=True))
        >>> p = project(model, torch.rand(1, 6, 6), "1", 0, (1, 2))
        >>> p.shape, bool((p[:, 4:, :] == 0).all())  # nothing outside the receptive field
        (torch.Size([1, 6, 6]), True)
    """
    return projections(model, image[None], node, [channel], [position], method=method)[0]


def projections(
    model: nn.Module,
    images: torch.Tensor,
    node: str,
    channels: Sequence[int],
    positions: Sequence[tuple[int, int]],
    *,
    method: Method = "deconvnet",
) -> torch.Tensor:
    """Many activations projected at once: image ``b``'s activation ``(channels[b],
    *positions[b])``, each alone, in one forward and one backward pass.

    The images of a batch do not mix in eval mode, so the gradient of the sum of the chosen
    activations with respect to image ``b`` is the projection of activation ``b`` alone: the
    same as :func:`project` for each, at the cost of one batched pass.

    Args:
        model: as for :func:`project`.
        images: ``[B, C, H, W]``, preprocessed as the model takes them.
        node: the node.
        channels: ``B`` channels, one per image.
        positions: ``B`` ``(row, column)`` positions on the node's grid, one per image.
        method: as for :func:`project`.

    Returns:
        ``[B, C, H, W]``: the projections, in the input's units.

    Raises:
        FeaturescopeError: an unknown method, a position off the node's grid, or not one
            channel and one position per image.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
        >>> images = torch.rand(2, 1, 6, 6)
        >>> both = projections(model, images, "1", [0, 1], [(0, 0), (2, 1)])
        >>> torch.allclose(both[1], project(model, images[1], "1", 1, (2, 1)))
        True
    """
    functions = {"deconvnet": _DeconvReLU, "guided": _GuidedReLU, "gradient": None}
    if method not in functions:
        raise FeaturescopeError(
            f"method must be 'deconvnet', 'guided' or 'gradient', got {method!r}"
        )
    if not len(channels) == len(positions) == len(images):
        raise FeaturescopeError(
            f"projections takes one channel and one position per image: {len(images)} images, "
            f"{len(channels)} channels, {len(positions)} positions"
        )
    tap = FeatureTap(model, [node])
    x = images.detach().clone().requires_grad_(True)
    function = functions[method]
    with training_mode(model, False), torch.enable_grad():
        if function is None:
            out = tap(x)[node]
        else:
            with _SwapReLU(function):
                out = tap(x)[node]
        grid = as_grid(out)
        where = torch.tensor([[c, *p] for c, p in zip(channels, positions, strict=True)])
        off = ((where < 0) | (where >= torch.tensor(grid.shape[1:]))).any(dim=1)
        if bool(off.any()):
            c, i, j = where[int(off.nonzero()[0])].tolist()
            raise FeaturescopeError(
                f"({c}, {i}, {j}) is off node {node!r}'s grid of "
                f"{grid.shape[1]} channels x {grid.shape[2]} x {grid.shape[3]}"
            )
        chosen = grid[torch.arange(len(x)), where[:, 0], where[:, 1], where[:, 2]]
        (projection,) = torch.autograd.grad(chosen.sum(), x)
    return projection.detach()
