"""The ground truth of a receptive field: where the gradient of one output position is non-zero.

The model is copied, made float64 with positive weights, and run under a torch function mode
that makes every nonlinearity pass its input (ReLUs, sigmoids, GELU...) and turns max-pooling
into average pooling over the same windows, so that no pixel hides behind a zero derivative.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from featurescope import FeatureTap, get_graph_node_names

_IDENTITY = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "hardswish", "hardswish_", "hardsigmoid",
    "silu", "silu_", "gelu", "tanh", "mish", "elu", "leaky_relu", "leaky_relu_", "dropout",
    "dropout_",
}  # fmt: skip
#: Gates stay bounded (an identity gate would square the values at each squeeze-and-excitation
#: block, overflowing float64) but get a derivative that never vanishes.
_GATES = {"sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_"}


class Linearized(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _IDENTITY:
            return args[0] if name.endswith("_") or kwargs.get("inplace") else args[0] * 1.0
        if name in _GATES:
            x = args[0]
            return 0.5 + 0.5 * x / (1 + x.abs())
        if name in ("max_pool2d", "_max_pool2d", "max_pool2d_with_indices"):
            bound = _pool_args(*args, **kwargs)
            out = F.avg_pool2d(
                bound["input"], bound["kernel_size"], bound["stride"] or bound["kernel_size"],
                bound["padding"], bound["ceil_mode"], count_include_pad=False,
            )  # fmt: skip
            assert bound["dilation"] in (1, (1, 1)), "dilated max-pooling has no average twin"
            return (out, None) if name.endswith("indices") else out
        if name in ("adaptive_max_pool2d", "_adaptive_max_pool2d"):
            return F.adaptive_avg_pool2d(args[0], args[1])
        return func(*args, **kwargs)


def _pool_args(
    input: torch.Tensor,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> dict[str, Any]:
    return dict(input=input, kernel_size=kernel_size, stride=stride, padding=padding,
                dilation=dilation, ceil_mode=ceil_mode)  # fmt: skip


def positive_copy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A float64 copy of ``model`` whose parameters are all positive and varied."""
    g = torch.Generator().manual_seed(seed)
    twin = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 0.5 + 0.5)
            # Each output an average of its inputs, so that deep networks stay within float64.
            p.div_(p[0].numel() if p.ndim > 1 else 1.0)
    return twin


def support_boxes(
    model: torch.nn.Module,
    size: tuple[int, int],
    queries: list[tuple[str, int, int, tuple[int, int] | None]],
    chunk: int | None = None,
) -> list[tuple[int, int, int, int] | None]:
    """For each ``(node, i, j, dims)``, the bounding box of the gradient's support of the sum
    at position ``(i, j)`` of the tensor dimensions ``dims`` (``None``: no pixel); ``dims=None``
    asks for the sum of the whole output.

    One forward and one backward per ``chunk`` queries: query ``q`` reads batch element ``q``
    of its chunk. Chunks bound the memory: a model with hundreds of nodes asks for a thousand
    queries, whose float64 activations together would not fit. By default a chunk holds as
    many pixels as 32 images of 64 × 64 (maxvit_t at 224 × 224 took 21 GiB with 32).
    """
    if chunk is None:
        chunk = max(1, min(32, 32 * 64 * 64 // (size[0] * size[1])))
    twin = positive_copy(model).requires_grad_(False)  # only the input's gradient is needed
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, *size, generator=g, dtype=torch.float64) + 0.5
    nodes = list(dict.fromkeys(q[0] for q in queries))
    first = get_graph_node_names(twin)[0][:1]  # the input: names differ between modes
    tap = FeatureTap(twin, train_return_nodes=first, eval_return_nodes=nodes, backend="fx").eval()
    found: list[tuple[int, int, int, int] | None] = []
    for start in range(0, len(queries), chunk):
        found += _support_chunk(tap, image, queries[start : start + chunk])
    return found


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a node's output, however nested in tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _support_chunk(
    tap: FeatureTap,
    image: torch.Tensor,
    queries: list[tuple[str, int, int, tuple[int, int] | None]],
) -> list[tuple[int, int, int, int] | None]:
    x = image.expand(len(queries), -1, -1, -1).clone().requires_grad_(True)
    with Linearized():
        outs = tap(x)
    target = x.new_zeros(())
    for k, (node, i, j, dims) in enumerate(queries):
        if dims is None:  # the whole output, which may be a tuple (attention's output, None)
            for leaf in _tensors(outs[node]):
                target = target + leaf[k : k + 1].sum()
        else:
            out = outs[node]
            assert isinstance(out, torch.Tensor), f"{node}: a local field on a {type(out)}"
            target = target + out[k : k + 1].select(dims[1], j).select(dims[0], i).sum()
    (grad,) = torch.autograd.grad(target, x)
    found: list[tuple[int, int, int, int] | None] = []
    for k in range(len(queries)):
        support = grad[k].abs().sum(0) != 0
        rows = torch.nonzero(support.any(1)).flatten()
        cols = torch.nonzero(support.any(0)).flatten()
        found.append(
            None
            if rows.numel() == 0
            else (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
        )
    return found
