"""Exact receptive fields on the fx graph: which input pixels each output position reads.

Every node of the traced eval graph gets one of four states, propagated in execution order:

- *constant*: it does not depend on the image (a parameter, a shape);
- *grid*: for each spatial axis of the input (rows, columns), the tensor dimension that carries
  it and, per position along it, the exact interval ``[lo, hi)`` of input indices it reads
  (the hull of what it reads, clipped to the image: padding reads nothing);
- *mixed*: positions were folded into other dimensions (a flatten, ViT's tokens) and only
  the union of what they read is known;
- *global*: it reads every input pixel, whatever the input's size (global pooling, attention,
  a ``Linear`` over flattened positions, a squeeze-and-excitation gate).

The intervals are exact for every op handled here, border effects included; the textbook
stride, size and offset (Araujo et al., "Computing receptive fields of convolutional neural
networks", Distill 2019) are carried beside them as a summary. An op this module does not
know raises a :class:`~featurescope.errors.FeaturescopeError` that names it rather than
guessing a box.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from featurescope.errors import FeaturescopeError
from featurescope.tap._fx import node_not_found, resolve_node, trace

__all__ = ["ReceptiveField", "receptive_field", "receptive_fields"]

Gates = Literal["global", "local"]


@dataclass(frozen=True)
class ReceptiveField:
    """The input pixels each output position of one node reads.

    Attributes:
        node: the graph node's name.
        input_size: the input's ``(height, width)``.
        output_size: the node's spatial ``(height, width)``, or ``None`` for a global node
            without a grid.
        stride: per axis, input pixels between neighbouring output positions.
        size: per axis, the textbook field size (before clipping to the image).
        offset: per axis, where position 0's field starts (negative under padding).
        is_global: the node reads every input pixel; :meth:`box` returns the whole image.
        gates: squeeze-and-excitation gates set aside with ``gates="local"`` (their global
            dependence is ignored so that the main path's local box remains); empty when the
            box is the whole truth.
        dims: the node's tensor dimensions that carry rows and columns (``(2, 3)`` for
            ``[N, C, H, W]``, ``(1, 2)`` for channel-last maps), or ``None`` when global.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))
        >>> fields = receptive_fields(model, ["0", "1"], (8, 8))
        >>> fields["0"].output_size, fields["0"].box(5, 5), fields["1"].is_global
        ((6, 6), (5, 5, 8, 8), True)
    """

    node: str
    input_size: tuple[int, int]
    output_size: tuple[int, int] | None
    stride: tuple[float, float]
    size: tuple[float, float]
    offset: tuple[float, float]
    is_global: bool
    gates: tuple[str, ...] = ()
    dims: tuple[int, int] | None = None
    rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64), repr=False)
    cols: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64), repr=False)

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """The input rows and columns position ``(i, j)`` reads: ``(top, left, bottom, right)``.

        Ends are exclusive and the box is clipped to the image.

        Example:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1))
            >>> rf = receptive_field(model, "0", (9, 9))
            >>> rf.box(0, 0), rf.box(1, 2), rf.stride, rf.size, rf.offset
            ((0, 0, 2, 2), (1, 3, 4, 6), (2.0, 2.0), (3.0, 3.0), (-1.0, -1.0))
        """
        height, width = self.input_size
        if self.is_global:
            return 0, 0, height, width
        assert self.output_size is not None
        if not (0 <= i < self.output_size[0] and 0 <= j < self.output_size[1]):
            raise FeaturescopeError(
                f"position ({i}, {j}) is outside node {self.node!r}'s "
                f"{self.output_size[0]}x{self.output_size[1]} grid"
            )
        return (
            int(self.rows[i, 0]),
            int(self.cols[j, 0]),
            int(self.rows[i, 1]),
            int(self.cols[j, 1]),
        )


# --- the states ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Axis:
    """One input axis on one tensor dimension: exact intervals and the textbook summary."""

    dim: int
    lo: np.ndarray
    hi: np.ndarray
    stride: Fraction
    size: Fraction
    offset: Fraction


@dataclass(frozen=True)
class _Grid:
    axes: tuple[_Axis, _Axis]
    gates: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Mixed:
    """Positions folded into ``dims``; ``lo``/``hi`` bound what all of them read, per axis."""

    dims: frozenset[int]
    lo: tuple[int, int]
    hi: tuple[int, int]
    gates: tuple[str, ...] = ()


class _Const:
    pass


class _Global:
    pass


CONST = _Const()
GLOBAL = _Global()
_State = Any  # _Grid | _Mixed | _Const | _Global, or a list of them for tuple outputs


class _Unknown(FeaturescopeError):
    pass


# --- op tables -----------------------------------------------------------------------------

#: Ops that act on each position alone (elementwise, or across channels at one position).
_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.Identity,
    nn.LocalResponseNorm,
)
_POINTWISE_NAMES = frozenset(
    {
        "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "selu", "celu", "gelu",
        "silu", "mish", "sigmoid", "sigmoid_", "tanh", "hardtanh", "hardtanh_", "hardswish",
        "hardsigmoid", "softplus", "dropout", "dropout2d", "alpha_dropout", "batch_norm",
        "add", "add_", "iadd", "sub", "sub_", "isub", "mul", "mul_", "imul", "truediv", "div",
        "div_", "itruediv", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "pow", "clamp",
        "clamp_", "contiguous", "clone", "detach", "float", "double", "half", "to", "type_as",
        "stochastic_depth", "where", "maximum", "minimum", "erf", "floordiv", "getattr_dtype",
    }
)  # fmt: skip
_MULTIPLY = frozenset({"mul", "mul_", "imul"})
#: Ops that mix every position of their input.
_MIXING_NAMES = frozenset(
    {"matmul", "bmm", "mm", "einsum", "scaled_dot_product_attention", "baddbmm", "linear"}
)
_SHAPE_NAMES = frozenset(
    {"reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as"}
)
_METADATA_NAMES = frozenset({"size", "dim", "numel", "getattr"})


def _op_name(node: fx.Node, module: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(module.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.lstrip("_") if name.startswith("_") and "pool" in name else name


# --- shapes --------------------------------------------------------------------------------


def _shapes(
    module: fx.GraphModule, *args: Any
) -> tuple[dict[fx.Node, Any], dict[fx.Node, tuple[Any, ...]]]:
    """Each node's output shape (a list of shapes for tuple outputs), from one real run, and
    the arguments of each call to a module this file does not know (traced into later)."""
    shapes: dict[fx.Node, Any] = {}
    calls: dict[fx.Node, tuple[Any, ...]] = {}
    identities: dict[fx.Node, int] = {}

    def shape_of(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        if isinstance(value, (tuple, list)):
            return [shape_of(v) for v in value]
        return None

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if n.op == "call_module" and not isinstance(
                module.get_submodule(str(n.target)), _KNOWN_MODULES
            ):
                calls[n] = self.fetch_args_kwargs_from_env(n)[0]
            unknown = n.op in ("call_function", "call_method") and not _is_known(n, module)
            before = (
                [
                    a.clone() if isinstance(a, torch.Tensor) else a
                    for a in self.fetch_args_kwargs_from_env(n)[0]
                ]
                if unknown
                else []
            )
            value = super().run_node(n)
            shapes[n] = shape_of(value)
            if unknown:
                args = self.fetch_args_kwargs_from_env(n)[0]
                for k, arg in enumerate(args):
                    # An unknown function that hands back its argument untouched (a check, an
                    # assertion wrapped with torch.fx.wrap) is the identity.
                    if value is arg and torch.equal(before[k], arg):
                        identities[n] = k
            return value

    with torch.no_grad():
        _Recorder(module).run(*args)
    for node, k in identities.items():
        calls[node] = (k,)  # read by _function_state: pass argument k through
    return shapes, calls


def _regroup(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """How a reshape from ``a`` to ``b`` groups dimensions: pairs of (input dims, output dims)."""
    i = j = 0
    groups: list[tuple[list[int], list[int]]] = []
    while i < len(a) or j < len(b):
        a_one = i < len(a) and a[i] == 1
        b_one = j < len(b) and b[j] == 1
        if a_one and not b_one:
            groups.append(([i], []))
            i += 1
            continue
        if b_one and not a_one:
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(a) or j >= len(b):
            raise FeaturescopeError(f"cannot reshape {tuple(a)} into {tuple(b)}")
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                gi.append(i)
                pa *= a[i]
                i += 1
            else:
                gj.append(j)
                pb *= b[j]
                j += 1
        groups.append((gi, gj))
    return groups


# --- the propagation -----------------------------------------------------------------------


@dataclass
class _Context:
    module: fx.GraphModule
    shapes: dict[fx.Node, Any]
    names: dict[fx.Node, str]
    image: tuple[int, int]
    gates: Gates
    calls: dict[fx.Node, tuple[Any, ...]]
    inputs: list[_State]
    states: dict[fx.Node, _State] = field(default_factory=dict)

    def state(self, arg: Any) -> _State:
        if isinstance(arg, fx.Node):
            return self.states[arg]
        if isinstance(arg, (tuple, list)):
            return [self.state(a) for a in arg]
        return CONST


def _flat_states(state: _State) -> list[_State]:
    if isinstance(state, list):
        return [s for item in state for s in _flat_states(item)]
    return [state]


def _inputs(node: fx.Node, ctx: _Context) -> list[_State]:
    found: list[_State] = []
    for arg in [*node.args, *node.kwargs.values()]:
        found.extend(_flat_states(ctx.state(arg)))
    return [s for s in found if s is not CONST]


def _cover(states: Sequence[_State], image: tuple[int, int]) -> _State:
    """The state of an op that mixes every position of ``states``."""
    if not states:
        return CONST
    if any(s is GLOBAL for s in states):
        return GLOBAL
    lo = [image[0], image[1]]
    hi = [0, 0]
    gates: tuple[str, ...] = ()
    for s in states:
        gates += s.gates
        for axis in range(2):
            if isinstance(s, _Grid):
                a = s.axes[axis]
                lo[axis], hi[axis] = min(lo[axis], int(a.lo.min())), max(hi[axis], int(a.hi.max()))
            else:
                lo[axis], hi[axis] = min(lo[axis], s.lo[axis]), max(hi[axis], s.hi[axis])
    if lo == [0, 0] and hi == list(image):
        return GLOBAL
    return _Mixed(frozenset(), (lo[0], lo[1]), (hi[0], hi[1]), gates)


def _mix_dims(state: _State, dims: frozenset[int], ctx: _Context) -> _State:
    """``state`` after an op that mixes the tensor dimensions ``dims``."""
    if isinstance(state, _Grid) and not {a.dim for a in state.axes} & dims:
        return state
    if isinstance(state, _Mixed) and not state.dims & dims:
        return state
    return _cover([state], ctx.image)


def _to_mixed(state: _Grid, dims: frozenset[int]) -> _Mixed:
    lo = (int(state.axes[0].lo.min()), int(state.axes[1].lo.min()))
    hi = (int(state.axes[0].hi.max()), int(state.axes[1].hi.max()))
    return _Mixed(dims, lo, hi, state.gates)


def _window(
    axis: _Axis,
    out: int,
    dim: int,
    kernel: int,
    stride: int,
    padding: int,
    dilation: int,
    size_in: int,
) -> _Axis:
    """An axis after a sliding window (convolution, pooling): exact, padding reads nothing."""
    starts = np.arange(out) * stride - padding
    lo = np.empty(out, np.int64)
    hi = np.empty(out, np.int64)
    taps = np.arange(kernel) * dilation
    for o in range(out):
        idx = starts[o] + taps
        idx = idx[(idx >= 0) & (idx < size_in)]
        if idx.size == 0:  # a window wholly in the padding reads nothing: an empty box
            lo[o], hi[o] = 0, 0
            continue
        lo[o], hi[o] = axis.lo[idx].min(), axis.hi[idx].max()
    span = (kernel - 1) * dilation + 1
    return _Axis(
        dim,
        lo,
        hi,
        axis.stride * stride,
        axis.size + (span - 1) * axis.stride,
        axis.offset - padding * axis.stride,
    )


def _pair(value: Any, n: int = 2) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


def _sliding(
    state: _State,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    params: Mapping[str, Any],
    ctx: _Context,
) -> _State:
    if not isinstance(state, _Grid):
        return _mix_dims(state, frozenset({len(in_shape) - 2, len(in_shape) - 1}), ctx)
    ndim = len(in_shape)
    kernel = _pair(params["kernel"])
    stride = _pair(params["stride"] or params["kernel"])
    dilation = _pair(params.get("dilation", 1))
    padding_arg = params.get("padding", 0)
    if padding_arg == "valid":
        padding: tuple[int, ...] = (0, 0)
    elif padding_arg == "same":
        padding = tuple((d * (k - 1)) // 2 for k, d in zip(kernel, dilation, strict=True))
    else:
        padding = _pair(padding_arg)
    axes = []
    for axis in state.axes:
        s = axis.dim - (ndim - 2)
        if s < 0:
            raise _Unknown("a window over dimensions other than the last two")
        axes.append(
            _window(
                axis,
                out_shape[axis.dim],
                axis.dim,
                kernel[s],
                stride[s],
                padding[s],
                dilation[s],
                in_shape[axis.dim],
            )
        )
    return _Grid((axes[0], axes[1]), state.gates)


def _adaptive(
    state: _State, out_shape: Sequence[int], in_shape: Sequence[int], ctx: _Context
) -> _State:
    ndim = len(in_shape)
    spatial = frozenset({ndim - 2, ndim - 1})
    if not isinstance(state, _Grid):
        return _mix_dims(state, spatial, ctx)
    if all(out_shape[d] == 1 for d in spatial):  # global pooling: every position, any input size
        return _cover([state], ctx.image)
    axes = []
    for axis in state.axes:
        n_in, n_out = in_shape[axis.dim], out_shape[axis.dim]
        lo = np.empty(n_out, np.int64)
        hi = np.empty(n_out, np.int64)
        for o in range(n_out):
            a, b = (o * n_in) // n_out, -((-(o + 1) * n_in) // n_out)
            lo[o], hi[o] = axis.lo[a:b].min(), axis.hi[a:b].max()
        ratio = Fraction(n_in, n_out)
        span = math.ceil(ratio)
        axes.append(
            _Axis(
                axis.dim,
                lo,
                hi,
                axis.stride * ratio,
                axis.size + (span - 1) * axis.stride,
                axis.offset,
            )
        )
    return _Grid((axes[0], axes[1]), state.gates)


def _interpolate(
    node: fx.Node, state: _State, out_shape: Sequence[int], in_shape: Sequence[int], ctx: _Context
) -> _State:
    """Upsampling: which input rows feed each output row, found by running the op on one-hots."""
    ndim = len(in_shape)
    if not isinstance(state, _Grid):
        return _mix_dims(state, frozenset({ndim - 2, ndim - 1}), ctx)
    if node.op == "call_module":
        up = ctx.module.get_submodule(str(node.target))
        call: Callable[[torch.Tensor], torch.Tensor] = up
    else:
        kwargs: dict[str, Any] = dict(node.kwargs)
        rest: tuple[Any, ...] = tuple(node.args[1:])
        call = lambda t: F.interpolate(t, *rest, **kwargs)  # noqa: E731
    axes = []
    for axis in state.axes:
        n_in = in_shape[axis.dim]
        other = next(in_shape[d] for d in range(ndim - 2, ndim) if d != axis.dim)
        probe = torch.zeros(
            (n_in, 1, *([n_in, other] if axis.dim == ndim - 2 else [other, n_in])),
            dtype=torch.float64,
        )
        for k in range(n_in):
            if axis.dim == ndim - 2:
                probe[k, 0, k, :] = 1.0
            else:
                probe[k, 0, :, k] = 1.0
        with torch.no_grad():
            out = call(probe)
        lines = out.abs().sum(dim=-1 if axis.dim == ndim - 2 else -2)[:, 0]  # [n_in, n_out]
        reads = (lines != 0).numpy()
        n_out = out_shape[axis.dim]
        lo = np.empty(n_out, np.int64)
        hi = np.empty(n_out, np.int64)
        for o in range(n_out):
            idx = np.nonzero(reads[:, o])[0]
            lo[o], hi[o] = axis.lo[idx].min(), axis.hi[idx].max()
        ratio = Fraction(n_in, n_out)
        axes.append(
            _Axis(axis.dim, lo, hi, axis.stride * ratio, axis.size + axis.stride, axis.offset)
        )
    return _Grid((axes[0], axes[1]), state.gates)


def _patch_merge(
    state: _State, out_shape: Sequence[int], in_shape: Sequence[int], ctx: _Context
) -> _State:
    """torchvision's ``_patch_merging_pad`` on ``[..., H, W, C]``: output ``(i, j)`` holds the
    tokens of rows ``2i, 2i + 1`` and columns ``2j, 2j + 1`` (an odd end padded with zeros)."""
    ndim = len(in_shape)
    spatial = (ndim - 3, ndim - 2)
    if not isinstance(state, _Grid):
        return _mix_dims(state, frozenset(spatial), ctx)
    if {a.dim for a in state.axes} != set(spatial):
        raise _Unknown("_patch_merging_pad with positions off its row and column dimensions")
    axes = [_window(a, out_shape[a.dim], a.dim, 2, 2, 0, 1, in_shape[a.dim]) for a in state.axes]
    return _Grid((axes[0], axes[1]), state.gates)


def _window_attention(
    node: fx.Node, state: _State, in_shape: Sequence[int], ctx: _Context
) -> _State:
    """torchvision's ``shifted_window_attention`` (Swin v1 and v2) on ``[B, H, W, C]``.

    The input is padded to whole windows, rolled by ``-shift`` and cut into windows; each token
    attends to every token of its window. The mask that keeps the wrapped-around regions of a
    shifted window apart adds -100 to their logits rather than -inf, so they still weigh
    ``exp(-100)`` (not zero, in float32 and float64 alike): a token reads its whole rolled
    window, wrapped part included, and its interval is the hull of that cyclic run of tokens.
    """
    rest = [*node.args[1:], *node.kwargs.values()]
    if any(isinstance(a, fx.Node) and ctx.state(a) is not CONST for a in rest):
        raise _Unknown("shifted_window_attention with weights computed from the input")
    ndim = len(in_shape)
    if not isinstance(state, _Grid):
        return _mix_dims(state, frozenset({ndim - 3, ndim - 2}), ctx)
    window = _pair(_arg(node, 4, "window_size"))
    shift = _pair(_arg(node, 6, "shift_size"))
    axes = []
    for axis in state.axes:
        t = axis.dim - (ndim - 3)
        if t not in (0, 1):
            raise _Unknown("shifted_window_attention with positions off dimensions 1 and 2")
        n, w = in_shape[axis.dim], window[t]
        padded = n + (w - n % w) % w
        s = 0 if w >= padded else shift[t]  # torchvision drops the shift of a single window
        lo = np.empty(n, np.int64)
        hi = np.empty(n, np.int64)
        for p in range(n):
            start = ((p - s) % padded) // w * w + s  # the window, back in unrolled positions
            members = (start + np.arange(w)) % padded
            members = members[members < n]  # the padding reads nothing
            lo[p], hi[p] = axis.lo[members].min(), axis.hi[members].max()
        # The summary: any window of w tokens holding this one (the wrap is in the intervals).
        axes.append(
            _Axis(
                axis.dim,
                lo,
                hi,
                axis.stride,
                axis.size + 2 * (w - 1) * axis.stride,
                axis.offset - (w - 1) * axis.stride,
            )
        )
    return _Grid((axes[0], axes[1]), state.gates)


def _slice(state: _State, index: Any, in_shape: Sequence[int]) -> _State:
    """``x[...]`` with slices, ``None`` and ``Ellipsis``; an integer on a position dim folds it."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(
        isinstance(i, fx.Node) or (not isinstance(i, (slice, int)) and i not in (None, Ellipsis))
        for i in items
    ):
        raise _Unknown("indexing with tensors")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = len(in_shape) - sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:at] + [slice(None)] * fill + items[at + 1 :]
    items += [slice(None)] * (len(in_shape) - sum(1 for i in items if i is not None))
    mapping: dict[int, int] = {}  # input dim -> output dim
    slices: dict[int, slice] = {}
    d_in = d_out = 0
    for item in items:
        if item is None:
            d_out += 1
            continue
        if isinstance(item, slice):
            mapping[d_in] = d_out
            slices[d_in] = item
            d_out += 1
        d_in += 1
    if isinstance(state, _Mixed):
        if any(d not in mapping for d in state.dims):
            return state  # a fold's dims are not positions: integer picks stay inside the hull
        return replace(state, dims=frozenset(mapping[d] for d in state.dims))
    if not isinstance(state, _Grid):
        return state
    axes = []
    for axis in state.axes:
        if axis.dim not in mapping:
            return _to_mixed(state, frozenset())
        start, stop, step = slices[axis.dim].indices(in_shape[axis.dim])
        picked = np.arange(start, stop, step)
        axes.append(
            _Axis(
                mapping[axis.dim],
                axis.lo[picked],
                axis.hi[picked],
                axis.stride * step,
                axis.size,
                axis.offset + start * axis.stride,
            )
        )
    return _Grid((axes[0], axes[1]), state.gates)


def _reshape(state: _State, in_shape: Sequence[int], out_shape: Sequence[int]) -> _State:
    groups = _regroup(in_shape, out_shape)
    if isinstance(state, _Mixed):
        dims = frozenset(o for gi, go in groups if set(gi) & state.dims for o in go)
        return replace(state, dims=dims)
    if not isinstance(state, _Grid):
        return state
    axes = []
    for axis in state.axes:
        group = next(g for g in groups if axis.dim in g[0])
        if len(group[0]) != 1 or len(group[1]) != 1:
            position_dims = frozenset(
                o for gi, go in groups if {a.dim for a in state.axes} & set(gi) for o in go
            )
            return _to_mixed(state, position_dims)
        axes.append(replace(axis, dim=group[1][0]))
    return _Grid((axes[0], axes[1]), state.gates)


def _permute(state: _State, order: Sequence[int]) -> _State:
    ndim = len(order)
    order = [o % ndim for o in order]
    where = {src: dst for dst, src in enumerate(order)}
    if isinstance(state, _Grid):
        a, b = state.axes
        return _Grid((replace(a, dim=where[a.dim]), replace(b, dim=where[b.dim])), state.gates)
    if isinstance(state, _Mixed):
        return replace(state, dims=frozenset(where[d] for d in state.dims))
    return state


def _union_axes(axes: Sequence[_Axis], dim: int, n: int) -> _Axis:
    lo = np.full(n, np.iinfo(np.int64).max, np.int64)
    hi = np.full(n, np.iinfo(np.int64).min, np.int64)
    for axis in axes:
        a_lo = axis.lo if axis.lo.size == n else np.broadcast_to(axis.lo, (n,))
        a_hi = axis.hi if axis.hi.size == n else np.broadcast_to(axis.hi, (n,))
        lo, hi = np.minimum(lo, a_lo), np.maximum(hi, a_hi)
    offset = min(a.offset for a in axes)
    end = max(a.offset + a.size for a in axes)
    return _Axis(dim, lo, hi, max(a.stride for a in axes), end - offset, offset)


def _elementwise(node: fx.Node, name: str, ctx: _Context) -> _State:
    """Broadcasting elementwise ops: per position, the union of what every operand reads."""
    out_shape = ctx.shapes[node]
    ndim = len(out_shape)
    operands: list[tuple[_State, Sequence[int], fx.Node]] = []
    for arg in [*node.args, *node.kwargs.values()]:
        if isinstance(arg, fx.Node) and ctx.states[arg] is not CONST:
            operands.append((ctx.states[arg], ctx.shapes[arg], arg))
    gates: tuple[str, ...] = ()
    grids: list[_Grid] = []
    mixed: list[_State] = []
    for state, shape, arg in operands:
        shift = ndim - len(shape)
        if state is GLOBAL:
            broadcast = len(shape) < 2 or all(s == 1 for s in shape[-2:])
            if ctx.gates == "local" and name in _MULTIPLY and broadcast and len(operands) > 1:
                gates += (ctx.names[arg],)
                continue
            return GLOBAL
        if isinstance(state, _Mixed):
            mixed.append(replace(state, dims=frozenset(d + shift for d in state.dims)))
        else:
            a, b = state.axes
            grids.append(
                _Grid((replace(a, dim=a.dim + shift), replace(b, dim=b.dim + shift)), state.gates)
            )
    if mixed or not grids:
        if not mixed and not grids:
            return GLOBAL
        folded = [_to_mixed(g, frozenset()) for g in grids] + mixed
        merged = _cover(folded, ctx.image)
        dims = frozenset(d for m in mixed for d in m.dims)
        if isinstance(merged, _Mixed):
            return _Mixed(dims, merged.lo, merged.hi, merged.gates + gates)
        return merged
    joined = {(g.axes[0].dim, g.axes[1].dim) for g in grids}
    if len(joined) != 1:
        raise _Unknown(f"{name} joining tensors whose positions lie on different dimensions")
    (d0, d1) = joined.pop()
    axes = (
        _union_axes([g.axes[0] for g in grids], d0, out_shape[d0]),
        _union_axes([g.axes[1] for g in grids], d1, out_shape[d1]),
    )
    for g in grids:
        gates += g.gates
    return _Grid(axes, tuple(dict.fromkeys(gates)))


def _concat(node: fx.Node, ctx: _Context) -> _State:
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    assert isinstance(tensors, (list, tuple))
    ndim = len(ctx.shapes[node])
    dim = _int(dim) % ndim
    states = [ctx.state(t) for t in tensors]
    live = [s for s in states if s is not CONST]
    grids = [s for s in live if isinstance(s, _Grid)]
    if grids and len(grids) == len(live) and any(a.dim == dim for a in grids[0].axes):
        if len(grids) != len(states):
            raise _Unknown("concatenating constants along a position dimension")
        which = 0 if grids[0].axes[0].dim == dim else 1
        joined = [g.axes[which] for g in grids]
        first = joined[0]
        axis = _Axis(
            dim,
            np.concatenate([a.lo for a in joined]),
            np.concatenate([a.hi for a in joined]),
            first.stride,
            first.size,
            first.offset,
        )
        other = grids[0].axes[1 - which]
        axes = (axis, other) if which == 0 else (other, axis)
        return _Grid(axes, tuple(g for s in grids for g in s.gates))
    # Along channels (or tokens): every operand sits at the same positions.
    fake = fx.Node(
        node.graph, "cat_join", "call_function", operator.add, tuple(t for t in tensors), {}
    )
    ctx.shapes[fake] = ctx.shapes[node]
    try:
        return _elementwise(fake, "cat", ctx)
    finally:
        del ctx.shapes[fake]


def _int(value: Any) -> int:
    """An int from a graph argument (typed loosely by torch.fx)."""
    return int(value)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dims_arg(value: Any, ndim: int) -> frozenset[int]:
    if value is None:
        return frozenset(range(ndim))
    if isinstance(value, int):
        return frozenset({value % ndim})
    return frozenset(int(v) % ndim for v in value)


def _propagate(node: fx.Node, ctx: _Context) -> _State:
    if node.op == "placeholder":
        k = [n for n in node.graph.nodes if n.op == "placeholder"].index(node)
        return ctx.inputs[k] if k < len(ctx.inputs) else CONST
    if node.op == "output":
        return ctx.state(node.args[0])
    if node.op == "get_attr":
        return CONST
    inputs = _inputs(node, ctx)
    if not inputs:
        return CONST
    name = _op_name(node, ctx.module)
    out_shape = ctx.shapes[node]
    first = node.args[0] if node.args else None
    state = ctx.state(first) if isinstance(first, fx.Node) else inputs[0]
    in_shape = ctx.shapes.get(first) if isinstance(first, fx.Node) else None
    if name in _METADATA_NAMES or out_shape is None:
        if (
            node.op == "call_function"
            and node.target is operator.getitem
            and isinstance(state, list)
        ):
            return state[_int(node.args[1])]
        if name in _METADATA_NAMES or not isinstance(out_shape, list):
            return CONST
    if node.op == "call_module":
        return _module_state(
            node, ctx.module.get_submodule(str(node.target)), state, in_shape, out_shape, ctx
        )
    return _function_state(node, name, state, in_shape, out_shape, ctx)


def _module_state(
    node: fx.Node, mod: nn.Module, state: _State, in_shape: Any, out_shape: Any, ctx: _Context
) -> _State:
    if isinstance(mod, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        params = {
            "kernel": mod.kernel_size,
            "stride": mod.stride,
            "padding": mod.padding,
            "dilation": getattr(mod, "dilation", 1),
        }
        return _sliding(state, out_shape, in_shape, params, ctx)
    if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return _adaptive(state, out_shape, in_shape, ctx)
    if isinstance(mod, nn.Upsample):
        return _interpolate(node, state, out_shape, in_shape, ctx)
    if isinstance(mod, _POINTWISE_MODULES):
        return _elementwise(node, "pointwise", ctx)
    if isinstance(mod, nn.Flatten):
        return _reshape(state, in_shape, out_shape)
    if isinstance(mod, nn.Linear):
        return _mix_dims(state, frozenset({len(in_shape) - 1}), ctx)
    if isinstance(mod, nn.LayerNorm):
        n = len(mod.normalized_shape)
        return _mix_dims(state, frozenset(range(len(in_shape) - n, len(in_shape))), ctx)
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        return _mix_dims(state, _dims_arg(mod.dim, len(in_shape)), ctx)
    if isinstance(mod, (nn.GroupNorm, nn.InstanceNorm2d, nn.MultiheadAttention)):
        return _cover(_inputs(node, ctx), ctx.image)  # statistics or attention over positions
    if node in ctx.calls and not type(mod).__module__.startswith("torch.nn"):
        return _inside(mod, node, ctx)  # a module the tracer kept whole: follow its own graph
    raise _Unknown(type(mod).__name__)


def _inside(mod: nn.Module, node: fx.Node, ctx: _Context) -> _State:
    try:
        inner = fx.symbolic_trace(mod)
    except Exception as err:
        raise _Unknown(f"{type(mod).__name__} (which torch.fx cannot trace: {err})") from None
    args = ctx.calls[node]
    shapes, calls = _shapes(inner, *args)
    sub = _Context(
        inner,
        shapes,
        {n: f"{ctx.names.get(node, node.name)}.{n.name}" for n in inner.graph.nodes},
        ctx.image,
        ctx.gates,
        calls,
        [ctx.state(a) for a in node.args],
    )
    for n in inner.graph.nodes:
        sub.states[n] = _propagate(n, sub)
        if n.op == "output":
            return sub.states[n]
    raise AssertionError("a graph without output")  # pragma: no cover


def _function_state(
    node: fx.Node, name: str, state: _State, in_shape: Any, out_shape: Any, ctx: _Context
) -> _State:
    target = node.target
    if name in ("conv2d",) or target in (F.conv2d, torch.conv2d):
        weight = ctx.shapes.get(_arg(node, 1, "weight"))
        params = {
            "kernel": tuple(weight[-2:]) if weight else None,
            "stride": _arg(node, 3, "stride", 1),
            "padding": _arg(node, 4, "padding", 0),
            "dilation": _arg(node, 5, "dilation", 1),
        }
        return _sliding(state, out_shape, in_shape, params, ctx)
    if name in ("max_pool2d", "avg_pool2d", "max_pool2d_with_indices"):
        kernel = _arg(node, 1, "kernel_size")
        params = {
            "kernel": kernel,
            "stride": _arg(node, 2, "stride") or kernel,
            "padding": _arg(node, 3, "padding", 0),
            "dilation": _arg(node, 4, "dilation", 1) if name.startswith("max") else 1,
        }
        return _sliding(state, out_shape, in_shape, params, ctx)
    if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
        return _adaptive(state, out_shape, in_shape, ctx)
    if name in ("interpolate", "upsample"):
        return _interpolate(node, state, out_shape, in_shape, ctx)
    if target is operator.getitem:
        if isinstance(state, list):
            return state[_int(node.args[1])]
        return _slice(state, node.args[1], in_shape)
    if name in ("cat", "concat", "concatenate"):
        return _concat(node, ctx)
    if name in _POINTWISE_NAMES:
        return _elementwise(node, name, ctx)
    if name in ("permute",):
        order = (
            node.args[1:]
            if not isinstance(_arg(node, 1, "dims"), (list, tuple))
            else _arg(node, 1, "dims")
        )
        return _permute(state, [_int(o) for o in order])
    if name in ("transpose", "swapaxes"):
        ndim = len(in_shape)
        d0, d1 = int(_arg(node, 1, "dim0")) % ndim, int(_arg(node, 2, "dim1")) % ndim
        order = list(range(ndim))
        order[d0], order[d1] = order[d1], order[d0]
        return _permute(state, order)
    if name in _SHAPE_NAMES:
        return _reshape(state, in_shape, out_shape)
    if name in ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "norm"):
        dims = _dims_arg(_arg(node, 1, "dim"), len(in_shape))
        mixed = _mix_dims(state, dims, ctx)
        keep = _arg(node, 2, "keepdim", False)
        if mixed is state and not keep:
            return _reshape(state, in_shape, out_shape)
        return mixed
    if name in ("softmax", "log_softmax", "layer_norm"):
        if name == "layer_norm":
            normalized = _pair(_arg(node, 1, "normalized_shape"), 1)
            dims = frozenset(range(len(in_shape) - len(normalized), len(in_shape)))
        else:
            dims = _dims_arg(_arg(node, 1, "dim"), len(in_shape))
        return _mix_dims(state, dims, ctx)
    if name in _MIXING_NAMES:
        return _cover(_inputs(node, ctx), ctx.image)
    if name == "shifted_window_attention":
        return _window_attention(node, state, in_shape, ctx)
    if name == "_patch_merging_pad":
        # Swin's patch merging: rows and columns 2i, 2i + 1 side by side (the odd end padded).
        return _patch_merge(state, out_shape, in_shape, ctx)
    if name in ("chunk", "split", "unbind"):
        dim = int(_arg(node, 2 if name != "unbind" else 1, "dim", 0)) % len(in_shape)
        if isinstance(state, _Grid) and any(a.dim == dim for a in state.axes):
            raise _Unknown(f"{name} along a position dimension")
        return [state] * len(out_shape)
    if node in ctx.calls and node.op != "call_module":
        return ctx.state(node.args[ctx.calls[node][0]])
    raise _Unknown(name)


_KNOWN_NAMES = (
    _POINTWISE_NAMES
    | _MIXING_NAMES
    | _SHAPE_NAMES
    | _METADATA_NAMES
    | {
        "conv2d", "max_pool2d", "avg_pool2d", "max_pool2d_with_indices", "adaptive_avg_pool2d",
        "adaptive_max_pool2d", "interpolate", "upsample", "getitem", "cat", "concat",
        "concatenate", "permute", "transpose", "swapaxes", "mean", "sum", "amax", "amin", "max",
        "min", "std", "var", "logsumexp", "norm", "softmax", "log_softmax", "layer_norm", "chunk",
        "split", "unbind", "shifted_window_attention", "_patch_merging_pad",
    }
)  # fmt: skip


def _is_known(node: fx.Node, module: fx.GraphModule) -> bool:
    return _op_name(node, module) in _KNOWN_NAMES


_KNOWN_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
    nn.Flatten,
    nn.Linear,
    nn.LayerNorm,
    nn.Softmax,
    nn.LogSoftmax,
    nn.GroupNorm,
    nn.InstanceNorm2d,
    nn.MultiheadAttention,
    *_POINTWISE_MODULES,
)


def _input_state(shape: Sequence[int]) -> _State:
    ndim = len(shape)
    axes = []
    for dim in (ndim - 2, ndim - 1):
        n = shape[dim]
        axes.append(
            _Axis(dim, np.arange(n), np.arange(n) + 1, Fraction(1), Fraction(1), Fraction(0))
        )
    return _Grid((axes[0], axes[1]))


# --- the public functions ------------------------------------------------------------------


def _image_size(input_size: Sequence[int]) -> tuple[int, ...]:
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        return (3, *size)
    if len(size) == 3:
        return size
    raise FeaturescopeError(
        f"input_size must be (height, width) or (channels, height, width), got {tuple(input_size)}"
    )


def receptive_fields(
    model: nn.Module,
    nodes: Sequence[str] | None,
    input_size: Sequence[int],
    *,
    gates: Gates = "global",
) -> dict[str, ReceptiveField]:
    """The exact receptive field of many nodes of ``model`` at once (one trace, one pass).

    Args:
        model: a model torch.fx can trace (its eval graph is analysed).
        nodes: node names as :class:`~featurescope.FeatureTap` takes them, or ``None`` for
            every node whose field is defined (global nodes included; nodes whose positions
            were folded into other dimensions, such as a flatten's, are left out).
        input_size: ``(height, width)`` or ``(channels, height, width)`` of one input image.
        gates: ``"global"`` (the definition: a squeeze-and-excitation gate reads every pixel,
            so what it scales is global) or ``"local"`` (set such gates aside and keep the
            main path's box; each field lists the gates it set aside in ``gates``).

    Returns:
        ``{node: ReceptiveField}`` in the order asked.

    Raises:
        FeaturescopeError: an op on the way to a node is not understood (the error names it),
            a node has no grid, or ``input_size`` is malformed.
        NodeNotFoundError: a node is not in the model.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18()
        >>> rfs = receptive_fields(model, ["layer1", "layer4", "avgpool"], (64, 64))
        >>> rfs["layer1"].stride, rfs["layer1"].size, rfs["layer4"].size
        ((4.0, 4.0), (43.0, 43.0), (435.0, 435.0))
        >>> rfs["layer1"].box(0, 0), rfs["avgpool"].is_global
        ((0, 0, 22, 22), True)
    """
    if gates not in ("global", "local"):
        raise FeaturescopeError(f"gates must be 'global' or 'local', got {gates!r}")
    size = _image_size(input_size)
    traced = trace(model, training=False)
    names = traced.names
    by_name = {name: node for node, name in traced.qualnames.items()}
    wanted = names if nodes is None else list(nodes)
    resolved: dict[str, str] = {}
    for query in wanted:
        found = resolve_node(query, names)
        if found is None:
            raise node_not_found(query, names, model, "in eval mode")
        resolved[query] = found
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros((1, *size), dtype=dtype, device=device)
    was_training = model.training
    model.eval()
    try:
        shapes, calls = _shapes(traced.module, x)
    finally:
        model.train(was_training)
    image = (size[1], size[2])
    ctx = _Context(
        traced.module, shapes, traced.qualnames, image, gates, calls, [_input_state(x.shape)]
    )
    order = {name: k for k, name in enumerate(names)}
    last = max((order[r] for r in resolved.values()), default=-1)
    for node in traced.module.graph.nodes:
        if node.op == "output":
            break
        try:
            ctx.states[node] = _propagate(node, ctx)
        except _Unknown as err:
            where = traced.qualnames.get(node, node.name)
            raise FeaturescopeError(
                f"receptive fields: {type(model).__name__} runs {err} at node {where!r}, which "
                "featurescope cannot follow; ask for a node before it, or file an issue naming "
                "this op"
            ) from None
        if order.get(traced.qualnames.get(node, ""), -1) >= last:
            break
    fields: dict[str, ReceptiveField] = {}
    for query, name in resolved.items():
        if ctx.states[by_name[name]] is CONST:
            if nodes is None:
                continue
            raise FeaturescopeError(f"node {name!r} reads no input pixel (it is a constant)")
        field_ = _field(name, ctx.states[by_name[name]], ctx.shapes[by_name[name]], ctx.image)
        if field_ is None:
            if nodes is None:
                continue
            raise FeaturescopeError(
                f"node {name!r} has no spatial grid: its positions were folded into other "
                "dimensions (a flatten or a reshape into tokens); ask for a node before it"
            )
        fields[query] = field_
    return fields


def _field(name: str, state: _State, shape: Any, image: tuple[int, int]) -> ReceptiveField | None:
    if state is GLOBAL:
        return ReceptiveField(
            name, image, None, (0.0, 0.0), (float(image[0]), float(image[1])), (0.0, 0.0), True
        )
    if not isinstance(state, _Grid):
        return None
    rows, cols = state.axes
    return ReceptiveField(
        name,
        image,
        (int(shape[rows.dim]), int(shape[cols.dim])),
        (float(rows.stride), float(cols.stride)),
        (float(rows.size), float(cols.size)),
        (float(rows.offset), float(cols.offset)),
        False,
        state.gates,
        (rows.dim, cols.dim),
        np.stack([rows.lo, rows.hi], axis=1),
        np.stack([cols.lo, cols.hi], axis=1),
    )


def receptive_field(
    model: nn.Module, node: str, input_size: Sequence[int], *, gates: Gates = "global"
) -> ReceptiveField:
    """The exact receptive field of one node: what each of its positions reads of the input.

    Computed on the fx graph through convolutions (stride, padding, dilation, groups), pooling
    (ceil mode, adaptive), strided slicing, elementwise joins (the union), concatenation,
    upsampling, permutes and Swin's (shifted) window attention and patch merging; global
    pooling, attention across every position, a ``Linear`` over flattened positions and
    squeeze-and-excitation gates make a field global. See :func:`receptive_fields` for the
    arguments.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2)
        ... )
        >>> rf = receptive_field(model, "2", (32, 32))
        >>> rf.stride, rf.size, rf.box(0, 1), rf.is_global
        ((4.0, 4.0), (9.0, 9.0), (0, 4, 9, 13), False)
    """
    return receptive_fields(model, [node], input_size, gates=gates)[node]
