"""Grad-CAM (Selvaraju et al., 2017): where in the image a class score comes from.

A :class:`~featurescope.FeatureTap` returns a spatial node's activations ``A`` and the class
scores in one forward pass, with autograd on. The gradient of the explained class's score with
respect to ``A``, averaged over space, weighs each channel; the map is the ReLU of the weighted
channel sum, upsampled bilinearly to the input's size. ``A`` may be ``[N, C, h, w]``,
channels-last ``[N, h, w, C]`` (Swin, ConvNeXt blocks) or a ViT's ``[N, tokens, C]``, laid out
on its patch grid with the class token dropped (as Grad-CAM is done on ViTs).
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
from featurescope.tap._camnode import pick_node
from featurescope.tap._maps import LAYOUTS, MapLayout, read_layout, to_chw
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
        layout: how the node's output lies over the image: ``"chw"``, ``"hwc"`` or
            ``"tokens"``.
        grid: ``(h, w)``, the node's map size (for tokens, the patch grid).
    """

    maps: Tensor
    targets: Tensor
    scores: Tensor
    node: str
    layout: str = "chw"
    grid: tuple[int, int] = (0, 0)


def _output_node(model: nn.Module) -> str:
    return get_graph_node_names(model)[1][-1]


def last_spatial_node(model: nn.Module, input_size: Sequence[int]) -> str:
    """The node Grad-CAM weighs by default: the last spatial map whose gradient is its own.

    Among the nodes whose output, for an input of ``input_size`` (``[3, H, W]``), is a map
    larger than 1 × 1 over the image (``[N, C, h, w]``, channels-last ``[N, h, w, C]``, or a
    ViT's ``[N, tokens, C]`` on its patch grid), the last one whose gradient is its own and
    reaches the output from more than one position. So a pooled ``1 × 1`` map (resnet's
    ``avgpool``) is never chosen, nor a node that a later in-place op overwrites, nor a
    transformer's tokens after its last attention (they reach the head through the class
    token alone: a ViT gets its last block's ``ln_1``, as Grad-CAM users of ViTs pick).

    Shapes come from fake tensors (nothing computed); one forward and backward pass of a fixed
    noise image tells which gradients reach the output.

    Raises:
        FeaturescopeError: no node qualifies (e.g. the input is too small for any map larger
            than 1 × 1), or torch.fx cannot trace the model.

    Example:
        >>> import featurescope as fs
        >>> last_spatial_node(fs.create_model("alexnet"), (3, 227, 227))
        'conv3.6'
        >>> last_spatial_node(fs.create_model("resnet18"), (3, 64, 64))
        'layer4.1.relu_1'
    """
    return pick_node(model, input_size)[0]


def grad_cam(
    model: nn.Module,
    images: Tensor,
    node: str | None = None,
    target: int | Sequence[int] | Tensor | None = None,
    *,
    layout: str | None = None,
) -> GradCam:
    """Grad-CAM maps of a batch of preprocessed images for one class each.

    Args:
        model: a classifier that torch.fx can trace (every zoo model).
        images: ``[N, 3, H, W]`` (or one ``[3, H, W]``) preprocessed images.
        node: the node to weigh; default :func:`last_spatial_node`.
        target: the class to explain, one for all images or one per image; default each
            image's predicted class.
        layout: how the node's output lies over the image: ``"chw"`` (``[N, C, h, w]``),
            ``"hwc"`` (``[N, h, w, C]``) or ``"tokens"`` (``[N, tokens, C]``, a few class or
            register tokens first); default read from its shape and the input's size,
            channels-first where both fit.

    Returns:
        A :class:`GradCam`. The model's mode and gradients are left as they were.

    Raises:
        InputShapeError: ``images`` is not ``[N, 3, H, W]``, or the node's output is not a
            map over the image in any layout (or in ``layout``).
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
    if layout is not None and layout not in LAYOUTS:
        raise FeaturescopeError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
    node = node or last_spatial_node(model, tuple(images.shape[1:]))
    output = _output_node(model)
    if output == node:
        raise FeaturescopeError(f"node {node!r} is the model's output; choose a spatial node")
    tap = FeatureTap(model, {node: "activation", output: "scores"})
    with training_mode(model, False):
        overwritten = "activation" in tap.copied and "activation" not in getattr(
            tap._program, "rewritten", ()
        )
    if overwritten:
        raise FeaturescopeError(
            f"a later in-place op overwrites node {node!r}, so its gradient cannot be taken; "
            "use the node of that op instead (featurescope.get_graph_node_names(model))"
        )
    device = model_device(model) or torch.device("cpu")
    x = images.detach().to(device).requires_grad_(True)
    with training_mode(model, False), torch.enable_grad():
        out = tap(x)
        activation, scores = out["activation"], out["scores"]
        image = (int(images.shape[-2]), int(images.shape[-1]))
        found = _layout(node, activation, image, layout)
        targets = _targets(target, scores)
        chosen = scores.gather(1, targets[:, None]).sum()
        (grads,) = torch.autograd.grad(chosen, activation)
    maps, grads = to_chw(activation.detach(), found), to_chw(grads, found)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * maps).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return GradCam(
        maps=cam[:, 0].float().cpu(),
        targets=targets.cpu(),
        scores=scores.detach().float().cpu(),
        node=node,
        layout=found.kind,
        grid=found.grid,
    )


def _layout(node: str, value: Any, image: tuple[int, int], layout: str | None) -> MapLayout:
    shape = tuple(value.shape) if isinstance(value, Tensor) else ()
    found = read_layout(shape, image, layout)
    if found is None and layout is None and len(shape) == 4:
        # A map of another aspect than the image's (an asymmetric pooling): channels-first.
        found = MapLayout("chw", (shape[2], shape[3]))
    if found is None:
        raise InputShapeError(
            f"node {node!r} outputs shape {list(shape)}, not a map over the "
            f"{image[0]}×{image[1]} input: [N, C, h, w], [N, h, w, C] or [N, tokens, C] on a "
            f"patch grid{f' (layout={layout!r})' if layout else ''}; choose a spatial node"
        )
    return found


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
