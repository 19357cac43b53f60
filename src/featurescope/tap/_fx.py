"""The torch.fx backend of FeatureTap: torchvision's node names, a pruned graph, in-place safety.

The model is traced with torchvision's ``NodePathTracer`` (so node names are those of
``create_feature_extractor`` and ``get_graph_node_names``, except where torchvision names a module
by another's path: see :func:`_tracer_class`), once in training and once in eval mode.
Each graph returns the requested nodes and loses everything they do not depend on. Then every
requested node whose storage a later op overwrites in place (``ReLU(inplace=True)``, ``add_``,
``x += y``) gets one ``clone`` right after it; no other node is copied.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from featurescope.errors import FeaturescopeError, NodeNotFoundError, did_you_mean
from featurescope.tap._containers import map_tensors
from featurescope.tap._inplace import _inplace_position, mutated_args, mutates_first_arg
from featurescope.tap._trace import Trace, resolve_node, trace

__all__ = [
    "FxProgram",
    "Trace",
    "build_program",
    "node_not_found",
    "resolve_node",
    "trace",
]

# Ops known to return a new tensor; any other op may return a view of (alias) its inputs.
_FRESH_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
    nn.Bilinear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
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
    nn.Softmax,
    nn.LogSoftmax,
    nn.PReLU,
    nn.Upsample,
    nn.Embedding,
)
_FRESH_FUNCTIONS: frozenset[Any] = frozenset(
    {
        torch.conv1d,
        torch.conv2d,
        torch.conv3d,
        torch.matmul,
        torch.mm,
        torch.bmm,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.cat,
        torch.stack,
        torch.relu,
        torch.sigmoid,
        torch.tanh,
        torch.exp,
        torch.log,
        torch.sqrt,
        torch.abs,
        torch.mean,
        torch.sum,
        torch.softmax,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.linear,
        F.relu,
        F.relu6,
        F.leaky_relu,
        F.elu,
        F.hardtanh,
        F.hardswish,
        F.hardsigmoid,
        F.mish,
        F.celu,
        F.selu,
        F.threshold,
        F.gelu,
        F.silu,
        F.sigmoid,
        F.tanh,
        F.softmax,
        F.log_softmax,
        F.max_pool1d,
        F.max_pool2d,
        F.max_pool3d,
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        F.interpolate,
        F.batch_norm,
        F.layer_norm,
        F.group_norm,
        operator.sub,
        operator.truediv,
        operator.matmul,
        operator.neg,
        operator.pow,
    }
)
# ``a + b`` and ``a * b`` make a new tensor from tensors, but a tuple or list that holds the same
# tensors from sequences (``x.chunk(2) + (y,)``, ``[x] * 2``): new storage only when an operand
# is known to be a tensor (or, for ``+``, a number: a sequence plus a number is an error).
_SEQUENCE_OPERATORS: frozenset[Any] = frozenset({operator.add, operator.mul})
# Leaf modules that return one tensor (possibly their input itself), never a container.
_TENSOR_MODULES: tuple[type[nn.Module], ...] = (
    *_FRESH_MODULES,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Flatten,
    nn.Unflatten,
)
# Functions and methods that return one tensor that may be a view of their input.
_VIEW_FUNCTIONS: frozenset[Any] = frozenset(
    {
        torch.flatten,
        torch.reshape,
        torch.permute,
        torch.transpose,
        torch.squeeze,
        torch.unsqueeze,
        torch.narrow,
        F.dropout,
        F.pad,
    }
)
_VIEW_METHODS = frozenset(
    {
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "permute",
        "transpose",
        "flatten",
        "contiguous",
        "expand",
        "expand_as",
        "squeeze",
        "unsqueeze",
        "narrow",
        "select",
        "to",
        "type_as",
        "float",
        "detach",
    }
)
_FRESH_METHODS = frozenset(
    {
        "add",
        "sub",
        "mul",
        "div",
        "matmul",
        "mm",
        "relu",
        "sigmoid",
        "tanh",
        "exp",
        "log",
        "sqrt",
        "abs",
        "neg",
        "pow",
        "mean",
        "sum",
        "softmax",
        "log_softmax",
        "clone",
    }
)


def _candidates(names: list[str]) -> list[str]:
    # Offer the module prefixes too: "conv1" is a valid request though no node is named so.
    prefixes = [".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)]
    return list(dict.fromkeys(names + prefixes))


def node_not_found(query: str, names: list[str], model: nn.Module, where: str) -> NodeNotFoundError:
    """The error for an unknown node name, with the closest names and where to list them all."""
    return NodeNotFoundError(
        f"node {query!r} is not in {type(model).__name__} (traced {where}).{did_you_mean(query, _candidates(names))} "
        "List the available names with featurescope.get_graph_node_names(model)."
    )


def _describe(node: fx.Node, module: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(module.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        return str(getattr(node.target, "__name__", node.target))
    return {"placeholder": "input", "get_attr": "attribute"}.get(node.op, node.op)


def _snapshot(value: Any) -> Any:
    """Copy the tensors in a node's output, so later in-place ops cannot change what we return."""
    return map_tensors(torch.Tensor.clone, value)


def _mutated_nodes(node: fx.Node, module: fx.GraphModule) -> list[fx.Node]:
    if node.op == "call_module":
        sub = module.get_submodule(str(node.target))
        if getattr(sub, "inplace", False) is True and node.args:
            mutated: list[Any] = [node.args[0]]
        else:
            mutated = []
    elif node.op in ("call_function", "call_method"):
        mutated = mutated_args(node.target, node.args, node.kwargs)
    else:
        mutated = []
    return [m for m in mutated if isinstance(m, fx.Node)]


def _is_plain(node: fx.Node, module: fx.GraphModule, plain: set[fx.Node]) -> bool:
    """Whether ``node`` surely returns a tensor or a number, never a container of tensors.

    ``plain`` holds the nodes before it already known so; anything unsure is a container.
    """
    if node.op == "get_attr":
        return True  # parameters, buffers and tensor constants
    if node.op == "call_module":
        return isinstance(module.get_submodule(str(node.target)), _TENSOR_MODULES)
    if node.op == "call_method":
        target = str(node.target)
        if target in _FRESH_METHODS or target in _VIEW_METHODS:
            return True
        return mutates_first_arg(target) and bool(node.args) and node.args[0] in plain
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return node.args[0] in plain  # an element of a tensor is a tensor
    if _in(node.target, _SEQUENCE_OPERATORS):
        return _numeric_operands(node, plain)
    return _in(node.target, _FRESH_FUNCTIONS) or _in(node.target, _VIEW_FUNCTIONS)


def _in(target: Any, functions: frozenset[Any]) -> bool:
    try:
        return target in functions
    except TypeError:  # unhashable target
        return False


def _numeric_operands(node: fx.Node, plain: set[fx.Node]) -> bool:
    """Whether ``a + b`` / ``a * b`` is arithmetic rather than a tuple or list repeated or joined."""
    for operand in node.args:
        if isinstance(operand, fx.Node):
            if operand in plain:
                return True
        elif isinstance(operand, (float, complex)) and not isinstance(operand, bool):
            return True  # a sequence times a float is an error
        elif node.target is operator.add and isinstance(operand, int):
            return True  # a sequence plus a number is an error
    return False


def _is_fresh(node: fx.Node, module: fx.GraphModule, plain: set[fx.Node]) -> bool:
    """Whether ``node`` surely returns new storage (if unsure, assume it may alias its inputs).

    A container (a tuple from ``chunk``, ``parts + (y,)``, a leaf module's named tuple) holds
    its inputs' tensors, so it shares their storage as a view does.
    """
    if node.op in ("placeholder", "get_attr", "output"):
        return True
    if _mutated_nodes(node, module):
        return False  # an in-place op returns the storage it wrote into
    if node.op == "call_module":
        return isinstance(module.get_submodule(str(node.target)), _FRESH_MODULES)
    if node.op == "call_method":
        return node.target in _FRESH_METHODS
    if node.target is _out_of_place:
        return True
    if _in(node.target, _SEQUENCE_OPERATORS):
        return _numeric_operands(node, plain)
    return _in(node.target, _FRESH_FUNCTIONS)


class _Storages:
    """Union-find over graph nodes whose outputs may share storage."""

    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, node: fx.Node) -> fx.Node:
        root = node
        while self.parent.get(root, root) is not root:
            root = self.parent[root]
        while node is not root:  # path compression
            self.parent[node], node = root, self.parent.get(node, root)
        return root

    def union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[ra] = rb


def _storages(nodes: list[fx.Node], module: fx.GraphModule) -> _Storages:
    """Which nodes may share storage, through views, in-place ops and containers alike.

    A node that is not surely fresh joins every node it reads, so a tensor taken out of a
    container (``getitem``, unpacking) shares storage with the container, which shares it with
    every tensor put in; an in-place write through any of them reaches the others.
    """
    storages = _Storages()
    plain: set[fx.Node] = set()
    for node in nodes:
        if _is_plain(node, module, plain):
            plain.add(node)
        if not _is_fresh(node, module, plain):
            for source in node.all_input_nodes:
                storages.union(node, source)
    return storages


def _eliminate_dead_code(graph: fx.Graph, module: fx.GraphModule) -> None:
    """Remove the nodes no output depends on, keeping in-place writes that a kept node reads.

    ``Graph.eliminate_dead_code`` would drop ``a.relu_()`` when its result is unused, though a
    later op reads ``a``. Here a write is kept when a kept node after it reads the storage it
    writes into, and only then. The output does not count as such a reader: requested nodes are
    returned as they were when computed (see :func:`_protect_inplace`).
    """
    nodes = list(graph.nodes)
    storages = _storages(nodes, module)
    live: set[fx.Node] = set()
    read_later: set[fx.Node] = set()  # storage roots read by kept nodes after the current one
    for node in reversed(nodes):
        keep = (
            node.op in ("placeholder", "output")
            or any(user in live for user in node.users)
            or (node.op == "call_function" and node.is_impure())
            or any(storages.find(t) in read_later for t in _mutated_nodes(node, module))
        )
        if not keep:
            continue
        live.add(node)
        if node.op != "output":
            read_later.update(storages.find(source) for source in node.all_input_nodes)
    for node in reversed(nodes):
        if node not in live:
            graph.erase_node(node)


# An in-place activation module's out-of-place form, reading the module's current settings.
_OUT_OF_PLACE: dict[type[nn.Module], Callable[[Any, torch.Tensor], torch.Tensor]] = {
    nn.ReLU: lambda m, x: F.relu(x),
    nn.ReLU6: lambda m, x: F.hardtanh(x, m.min_val, m.max_val),
    nn.Hardtanh: lambda m, x: F.hardtanh(x, m.min_val, m.max_val),
    nn.Hardswish: lambda m, x: F.hardswish(x),
    nn.Hardsigmoid: lambda m, x: F.hardsigmoid(x),
    nn.SiLU: lambda m, x: F.silu(x),
    nn.Mish: lambda m, x: F.mish(x),
    nn.LeakyReLU: lambda m, x: F.leaky_relu(x, m.negative_slope),
    nn.ELU: lambda m, x: F.elu(x, m.alpha),
    nn.CELU: lambda m, x: F.celu(x, m.alpha),
    nn.SELU: lambda m, x: F.selu(x),
    nn.Threshold: lambda m, x: F.threshold(x, m.threshold, m.value),
}
# Functions whose ``inplace=True`` may be turned off without changing what they compute.
_OUT_OF_PLACE_FUNCTIONS = frozenset(
    {
        F.relu,
        F.relu6,
        F.hardtanh,
        F.hardswish,
        F.hardsigmoid,
        F.silu,
        F.mish,
        F.leaky_relu,
        F.elu,
        F.celu,
        F.selu,
        F.threshold,
    }
)
# Unary in-place methods and their out-of-place twins (same dtype, same kernel).
_OUT_OF_PLACE_METHODS = {
    "relu_": "relu",
    "sigmoid_": "sigmoid",
    "tanh_": "tanh",
    "neg_": "neg",
    "abs_": "abs",
    "exp_": "exp",
    "sqrt_": "sqrt",
}


def _out_of_place(inner: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run one of the model's in-place activation modules without writing into its input.

    It takes the model's own module (a ``get_attr`` node, looked up on the model at each call)
    and reads its settings then, so it follows them.
    """
    return _OUT_OF_PLACE[type(inner)](inner, x)


def _make_out_of_place(node: fx.Node, module: fx.GraphModule) -> bool:
    """Rewrite the in-place call ``node`` to return new storage; ``False`` if it cannot be."""
    if node.op == "call_module":
        sub = module.get_submodule(str(node.target))
        if type(sub) not in _OUT_OF_PLACE or len(node.args) != 1 or node.kwargs:
            return False
        # Nothing is added to the module: the graph's code runs on the model itself.
        with node.graph.inserting_before(node):
            inner = node.graph.get_attr(str(node.target))
        node.op, node.target, node.args = "call_function", _out_of_place, (inner, node.args[0])
        return True
    if node.op == "call_function":
        target = node.target
        try:
            known = callable(target) and target in _OUT_OF_PLACE_FUNCTIONS
        except TypeError:  # unhashable target
            return False
        if not known or not callable(target):
            return False
        position = _inplace_position(target)
        if "inplace" in node.kwargs:
            node.kwargs = {**node.kwargs, "inplace": False}
            return True
        if position is not None and len(node.args) > position:
            node.args = (*node.args[:position], False, *node.args[position + 1 :])
            return True
        return False
    if node.op == "call_method" and node.target in _OUT_OF_PLACE_METHODS and len(node.args) == 1:
        node.target = _OUT_OF_PLACE_METHODS[str(node.target)]
        return True
    return False


def _rewrite_inplace(
    graph: fx.Graph, module: fx.GraphModule, outputs: dict[str, fx.Node]
) -> list[str]:
    """Make a later in-place write out of place where that alone keeps an output intact.

    ``relu_(bn)`` reads and writes ``bn`` once; ``clone(bn)`` then ``relu_`` does it twice. So
    where the first write into a requested node's storage is an in-place activation applied to
    that very node, no other node shares the storage up to it, and nothing reads the node after
    it, the activation is made out of place (same kernel, same values) and nothing is copied.

    Returns:
        The aliases kept intact so.
    """
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    storages = _storages(nodes, module)
    members: dict[fx.Node, list[fx.Node]] = {}
    writes: dict[fx.Node, list[fx.Node]] = {}  # per storage, the nodes writing into it, in order
    for n in nodes:
        members.setdefault(storages.find(n), []).append(n)
        for t in _mutated_nodes(n, module):
            writes.setdefault(storages.find(t), []).append(n)
    rewritten = []
    for alias, node in sorted(outputs.items(), key=lambda item: position[item[1]]):
        if node.op == "placeholder":
            continue
        root = storages.find(node)
        later = [w for w in writes.get(root, []) if position[w] > position[node]]
        if not later:
            continue
        write, at = later[0], position[later[0]]
        if not write.args or write.args[0] is not node or len(write.all_input_nodes) != 1:
            continue
        if any(m is not node and m is not write and position[m] <= at for m in members[root]):
            continue  # another alias of the storage exists: it may be read later
        if any(position[u] > at for u in node.users if u is not write and u.op != "output"):
            continue  # something reads the node after the write, expecting written values
        if not _make_out_of_place(write, module):
            continue
        rewritten.append(alias)
        # ``write`` now returns new storage: the node keeps its own, and everything after the
        # write shares the write's (no other path joins them, as just checked).
        members[root] = [m for m in members[root] if m is not node]
        writes[root] = [w for w in writes[root] if w is not write]
    return rewritten


def _protect_inplace(
    graph: fx.Graph, module: fx.GraphModule, outputs: dict[str, fx.Node]
) -> list[str]:
    """Insert a copy after each output node whose storage a later op writes into.

    Returns:
        The aliases that are copied.
    """
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    storages = _storages(nodes, module)
    writes = [(position[n], t) for n in nodes for t in _mutated_nodes(n, module)]
    copied = []
    last_placeholder = max((n for n in nodes if n.op == "placeholder"), key=position.__getitem__)
    for alias, node in outputs.items():
        root = storages.find(node)
        if not any(p > position[node] and storages.find(t) is root for p, t in writes):
            continue
        after = last_placeholder if node.op == "placeholder" else node
        with graph.inserting_after(after):
            outputs[alias] = graph.call_function(_snapshot, (node,))
        copied.append(alias)
    return copied


@dataclass
class FxProgram:
    """One mode's pruned graph that returns ``{alias: tensor}``, and what it taps."""

    module: fx.GraphModule
    nodes: dict[str, str]  # alias -> resolved node name
    ops: dict[str, str]  # alias -> what the node computes, e.g. "Conv2d"
    # Aliases a later in-place op would overwrite: copied, or (``rewritten``) kept intact by
    # making that op out of place.
    copied: list[str]
    rewritten: list[str] = field(default_factory=list)
    export_blocker: str | None = None  # torch.export captures the graph as is

    def __post_init__(self) -> None:
        # A pytree codegen (structured concrete_args) reads the GraphModule's own input spec.
        self._on_model = type(self.module.graph._codegen) is fx.graph.CodeGen
        #: The module the first input goes into, and nothing else does first; ``None`` if none.
        self.input_module = _input_module(self.module.graph)

    def __call__(self, model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Run the graph's code on ``model`` itself.

        The GraphModule holds its own references to the buffers and parameters the graph reads
        (``get_attr``), which go stale once the model replaces them (``model.to(dtype)`` swaps
        buffers, ``load_state_dict(assign=True)`` swaps both), so its code runs with the model
        as ``self``: every attribute is looked up on the model at each call.
        """
        if self._on_model:
            result: dict[str, Any] = type(self.module).forward(model, *args, **kwargs)
        else:
            result = self.module(*args, **kwargs)
        return result


def _input_module(graph: fx.Graph) -> str | None:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    users = list(placeholders[0].users) if placeholders else []
    if len(users) == 1 and users[0].op == "call_module":
        return str(users[0].target)
    return None


def _request(
    traced: Trace, query: str, by_name: Mapping[str, fx.Node], graph: fx.Graph
) -> tuple[fx.Node | None, str]:
    """``(node, its name)`` for one requested name; ``(None, query)`` if it names nothing.

    A node's own name comes first; then a module's name means that module's output (its first
    call's), a container rebuilt by a node added for it if need be; then, as in torchvision, a
    prefix means the last node under it.
    """
    if query in by_name:
        return by_name[query], query
    output = traced.module_outputs.get(query)
    if output is not None:
        node = output.node
        if node is None:
            return output.insert(graph), query
        return node, traced.qualnames.get(node, query)
    name = resolve_node(query, traced.names)
    return (by_name[name], name) if name is not None else (None, query)


def build_program(traced: Trace, return_nodes: Mapping[str, str], model: nn.Module) -> FxProgram:
    """Rewrite a traced graph to return ``return_nodes`` (``{node: alias}``), pruned and safe.

    Raises:
        NodeNotFoundError: a node name is not in the graph.
        FeaturescopeError: two requested names resolve to the same node.
    """
    module = traced.module
    graph = module.graph
    names = traced.names
    by_name = {name: node for node, name in traced.qualnames.items()}
    mode = "training mode" if traced.training else "eval mode"
    outputs: dict[str, fx.Node] = {}
    resolved: dict[str, str] = {}
    requested_by: dict[str, str] = {}
    for query, alias in return_nodes.items():
        node, name = _request(traced, query, by_name, graph)
        if node is None:
            raise node_not_found(query, names, model, f"in {mode}")
        if name in requested_by:
            raise FeaturescopeError(
                f"return_nodes asks for node {name!r} twice, as {requested_by[name]!r} and as "
                f"{query!r}; request each node once."
            )
        requested_by[name] = query
        outputs[alias] = node
        resolved[alias] = name
    ops = {alias: _describe(node, module) for alias, node in outputs.items()}
    modules = dict(model.named_modules())
    for alias, query in zip(return_nodes.values(), return_nodes, strict=True):
        if resolved[alias] == query and query in traced.module_outputs and query in modules:
            ops[alias] = type(modules[query]).__name__
    for node in [n for n in graph.nodes if n.op == "output"]:
        graph.erase_node(node)
    with graph.inserting_after(list(graph.nodes)[-1]):
        output = graph.output(dict(outputs))
    # Prune everything after the deepest requested node (and any branch it does not need).
    _eliminate_dead_code(graph, module)
    rewritten = _rewrite_inplace(graph, module, outputs)
    copied = _protect_inplace(graph, module, outputs)
    output.args = (dict(outputs),)
    graph.lint()
    module.recompile()
    protected = [a for a in outputs if a in set(rewritten) | set(copied)]
    return FxProgram(module, resolved, ops, protected, rewritten)
