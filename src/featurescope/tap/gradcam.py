"""Grad-CAM (Selvaraju et al., 2017): where in the image a class score comes from.

A :class:`~featurescope.FeatureTap` returns a spatial node's activations ``A`` ``[N, C, h, w]``
and the class scores in one forward pass, with autograd on. The gradient of the explained
class's score with respect to ``A``, averaged over space, weighs each channel; the map is the
ReLU of the weighted channel sum, upsampled bilinearly to the input's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featurescope._torch_utils import model_device, training_mode
from featurescope.errors import FeaturescopeError, InputShapeError
from featurescope.tap._tap import FeatureTap, get_graph_node_names

__all__ = ["GradCam", "grad_cam", "last_spatial_node"]


@dataclass(frozen=True)
class GradCam:
    """What :func:`grad_cam` found.

    Attributes:
        maps: ``[N, H, W]`` float32 class-activation maps at the input's resolution, ``>= 0``
            and not normalised (divide by each map's max to compare shapes).
        targets: ``[N]`` the class explained for each image.
        scores: ``[N, num_classes]`` the model's outputs (logits).
        node: the graph node whose activations were weighted.
    """

    maps: Tensor
    targets: Tensor
    scores: Tensor
    node: str


def _output_node(model: nn.Module) -> str:
    return get_graph_node_names(model)[1][-1]


def last_spatial_node(model: nn.Module, input_size: Sequence[int]) -> str:
    """The last graph node whose output is a ``[N, C, H, W]`` map (``"conv3.6"`` for AlexNet).

    Found by one forward pass of a zero image of ``input_size`` (``[3, H, W]``). Nodes that a
    later in-place op overwrites are skipped: their gradient would not be theirs.

    Example:
        >>> import featurescope as fs
        >>> last_spatial_node(fs.create_model("alexnet"), (3, 227, 227))
        'conv3.6'
    """
    names = get_graph_node_names(model)[1][1:-1]
    with training_mode(model, False), torch.no_grad():
        tap = FeatureTap(model, names)
        device = model_device(model) or torch.device("cpu")
        outputs = tap(torch.zeros(1, *input_size, device=device))
    copied = set(tap.copied)
    spatial = [
        name
        for name, value in outputs.items()
        if isinstance(value, Tensor) and value.dim() == 4 and name not in copied
    ]
    if not spatial:
        raise FeaturescopeError(
            f"{type(model).__name__} has no node with a [N, C, H, W] output to explain; pass "
            "node=... (featurescope.get_graph_node_names(model) lists the nodes)"
        )
    return str(spatial[-1])


def grad_cam(
    model: nn.Module,
    images: Tensor,
    node: str | None = None,
    target: int | Sequence[int] | Tensor | None = None,
) -> GradCam:
    """Grad-CAM maps of a batch of preprocessed images for one class each.

    Args:
        model: a classifier that torch.fx can trace (every zoo model).
        images: ``[N, 3, H, W]`` (or one ``[3, H, W]``) preprocessed images.
        node: the spatial node to weigh; default :func:`last_spatial_node`.
        target: the class to explain, one for all images or one per image; default each
            image's predicted class.

    Returns:
        A :class:`GradCam`. The model's mode and gradients are left as they were.

    Raises:
        InputShapeError: ``images`` is not ``[N, 3, H, W]``, or the node's output is not a
            ``[N, C, h, w]`` map.
        FeaturescopeError: ``target`` is out of range, or a later in-place op overwrites
            ``node`` (pick the node after that op).

    Example:
        >>> import torch, featurescope as fs
        >>> cam = fs.grad_cam(fs.create_model("alexnet"), torch.randn(2, 3, 227, 227))
        >>> tuple(cam.maps.shape), cam.node, bool((cam.maps >= 0).all())
        ((2, 227, 227), 'conv3.6', True)
    """
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise InputShapeError(
            f"grad_cam takes images [N, 3, H, W] or one [3, H, W], got {list(images.shape)}"
        )
    node = node or last_spatial_node(model, tuple(images.shape[1:]))
    output = _output_node(model)
    if output == node:
        raise FeaturescopeError(f"node {node!r} is the model's output; choose a spatial node")
    tap = FeatureTap(model, {node: "activation", output: "scores"})
    if "activation" in tap.copied:
        raise FeaturescopeError(
            f"a later in-place op overwrites node {node!r}, so its gradient cannot be taken; "
            "use the node of that op instead (featurescope.get_graph_node_names(model))"
        )
    device = model_device(model) or torch.device("cpu")
    x = images.detach().to(device).requires_grad_(True)
    with training_mode(model, False), torch.enable_grad():
        out = tap(x)
        activation, scores = out["activation"], out["scores"]
        if activation.dim() != 4:
            raise InputShapeError(
                f"node {node!r} outputs shape {list(activation.shape)}, not a [N, C, h, w] map"
            )
        targets = _targets(target, scores)
        chosen = scores.gather(1, targets[:, None]).sum()
        (grads,) = torch.autograd.grad(chosen, activation)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return GradCam(
        maps=cam[:, 0].float().cpu(),
        targets=targets.cpu(),
        scores=scores.detach().float().cpu(),
        node=node,
    )


def _targets(target: Any, scores: Tensor) -> Tensor:
    n, classes = scores.shape[0], scores.shape[1]
    if target is None:
        return scores.detach().argmax(dim=1)
    t = torch.as_tensor(target, dtype=torch.int64, device=scores.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise FeaturescopeError(f"target gives {t.numel()} classes for {n} images")
    if bool(((t < 0) | (t >= classes)).any()):
        raise FeaturescopeError(f"target classes must be in [0, {classes}), got {t.tolist()}")
    return t.contiguous()
