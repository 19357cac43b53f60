"""Which node Grad-CAM weighs by default: the last spatial map whose gradient is its own.

Shapes come from one pass of fake tensors through the eval graph (nothing is computed), so
every node whose output is a map over the image larger than 1 × 1 is a candidate: ``[N, C, h,
w]``, channels-last ``[N, h, w, C]``, or a ViT's ``[N, tokens, C]`` on its patch grid (see
:mod:`~featurescope.tap._maps`). One forward and backward pass of a fixed noise image then
keeps the candidates whose gradient is their own and reaches the output from more than one
position: a node that a later in-place op overwrites is copied by the tap and gets no gradient,
and the tokens after a transformer's last attention reach the head through the class token
alone. The last candidate kept is the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from featurescope._torch_utils import model_device, model_dtype, training_mode
from featurescope.errors import FeaturescopeError, InputShapeError
from featurescope.tap._fx import Trace, trace
from featurescope.tap._maps import MapLayout, read_layout, to_chw
from featurescope.tap._tap import FeatureTap

__all__ = ["Candidates", "map_candidates", "pick_node", "probe_image"]

# Candidates asked for in one probe pass, the last first; earlier ones only if none of these is
# kept (a ViT's last block holds a dozen token nodes after its attention).
_CHUNK = 24


class _Shapes(nn.Module):
    """Runs shape propagation inside ``torch.func.functional_call``, on swapped-in tensors."""

    def __init__(self, graph: fx.GraphModule) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: Tensor) -> Tensor:
        from torch.fx.passes.shape_prop import ShapeProp

        ShapeProp(self.graph).propagate(x)
        return x


def _propagate(traced: Trace, x: Tensor) -> None:
    """Record each node's output shape in ``node.meta``, on meta tensors where they work.

    Meta tensors carry shapes and no data, so a 600 M-parameter model costs what a small one
    does; the model's own tensors are left alone (``functional_call`` swaps in meta copies).
    """
    graph = traced.module
    state = {
        **dict(graph.named_parameters(remove_duplicate=False)),
        **dict(graph.named_buffers(remove_duplicate=False)),
    }
    runner = _Shapes(graph)
    try:
        meta = {f"graph.{k}": v.to("meta") for k, v in state.items()}
        torch.func.functional_call(runner, meta, (x.to("meta"),))
    except Exception:
        # An op without a meta kernel (or one that reads values): compute the shapes for real.
        try:
            with torch.no_grad():
                runner(x)
        except Exception as exc:
            raise InputShapeError(
                f"{type(graph).__name__} cannot run on an input of shape {list(x.shape[1:])}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


def _shape(meta: dict[str, object]) -> tuple[int, ...] | None:
    value = meta.get("val", meta.get("tensor_meta"))
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def probe_image(model: nn.Module, input_size: Sequence[int]) -> Tensor:
    """A fixed noise image ``[1, *input_size]`` on the model's device, in its dtype."""
    noise = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    device = model_device(model) or torch.device("cpu")
    return noise.to(device=device, dtype=model_dtype(model) or torch.float32)


@dataclass(frozen=True)
class Candidates:
    """The maps over the image, in execution order, and the nodes the probe differentiates."""

    maps: list[tuple[str, MapLayout]]
    output: str  # the model's output node
    head_inputs: list[str]  # what the output node reads: the embedding before the classifier


def map_candidates(model: nn.Module, input_size: Sequence[int]) -> Candidates:
    """The nodes whose output is a map larger than 1 × 1 over an input of ``input_size``.

    Raises:
        FeaturescopeError: torch.fx cannot trace the model.
        InputShapeError: the model cannot run on an input of ``input_size``.
    """
    try:
        traced = trace(model, training=False)
    except Exception as exc:
        raise FeaturescopeError(
            f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}), so "
            "Grad-CAM cannot choose its node; pass node=... (a module name)"
        ) from exc
    with training_mode(model, False):
        _propagate(traced, probe_image(model, input_size))
    image = (int(input_size[-2]), int(input_size[-1]))
    named = [(n, q) for n, q in traced.qualnames.items() if n.op != "placeholder"]
    last = named[-1][0]
    found = []
    for node, name in named[:-1]:
        shape = _shape(node.meta)
        layout = read_layout(shape, image) if shape and shape[0] == 1 else None
        if layout is not None and layout.spatial:
            found.append((name, layout))
    inputs = [
        traced.qualnames[n]
        for n in last.all_input_nodes
        if n.op != "placeholder" and n in traced.qualnames
    ]
    return Candidates(found, named[-1][1], inputs)


def _reaches(grad: Tensor | None, layout: MapLayout) -> bool:
    """Whether the gradient is non-zero at more than one position of the map."""
    if grad is None:
        return False
    positions = (to_chw(grad, layout) != 0).any(dim=1).sum()
    return int(positions) > 1


def _objective(values: Sequence[object]) -> Tensor | None:
    """A fixed random projection of the output and of the head's input, summed.

    Random weights, so that no sum cancels (a LayerNorm's outputs sum to zero); the head's
    input too, since a fresh head may be all zeros (torchvision's ViTs are made so).
    """
    generator = torch.Generator().manual_seed(1)
    total: Tensor | None = None
    for value in values:
        if isinstance(value, Tensor) and value.requires_grad and value.is_floating_point():
            weights = torch.randn(value.shape, generator=generator).to(value.device)
            term = (value.float() * weights).sum()
            total = term if total is None else total + term
    return total


def _kept(
    model: nn.Module, x: Tensor, chunk: list[tuple[str, MapLayout]], found: Candidates
) -> list[bool]:
    aliases = {name: f"candidate{i}" for i, (name, _) in enumerate(chunk)}
    ends = {name: f"end{i}" for i, name in enumerate([found.output, *found.head_inputs])}
    tap = FeatureTap(model, {**aliases, **{n: a for n, a in ends.items() if n not in aliases}})
    with training_mode(model, False), torch.enable_grad():
        out = tap(x.detach().requires_grad_(True))
        values = [out[aliases[name]] for name, _ in chunk]
        wanted = [v for v in values if isinstance(v, Tensor) and v.requires_grad]
        objective = _objective([out[a] for a in ends.values() if a in out])
        if not wanted or objective is None:
            return [False] * len(chunk)
        grads = iter(torch.autograd.grad(objective, wanted, allow_unused=True))
    return [
        isinstance(v, Tensor) and v.requires_grad and _reaches(next(grads), layout)
        for v, (_, layout) in zip(values, chunk, strict=True)
    ]


def pick_node(model: nn.Module, input_size: Sequence[int]) -> tuple[str, MapLayout]:
    """The default Grad-CAM node and its layout (see the module's docstring).

    Raises:
        FeaturescopeError: no node qualifies (or torch.fx cannot trace the model).
    """
    found = map_candidates(model, input_size)
    x = probe_image(model, input_size)
    end = len(found.maps)
    while end > 0:
        chunk = found.maps[max(0, end - _CHUNK) : end]
        kept = _kept(model, x, chunk, found)
        for (name, layout), ok in zip(reversed(chunk), reversed(kept), strict=True):
            if ok:
                return name, layout
        end -= len(chunk)
    size = "×".join(str(int(s)) for s in input_size[-2:])
    raise FeaturescopeError(
        f"{type(model).__name__} has no node whose output is a map larger than 1 × 1 over a "
        f"{size} input ([N, C, h, w], [N, h, w, C] or [N, tokens, C] on a patch grid) with a "
        "gradient of its own; use a larger input, or pass node=... "
        "(featurescope.get_graph_node_names(model) lists the nodes)"
    )
