"""Tracing a model for FeatureTap: node names as promised, each module's output, no side effects.

The model is traced with torchvision's ``NodePathTracer``, so node names are those of
``create_feature_extractor`` and ``get_graph_node_names``, except where torchvision names a node
by another's path (see :func:`name_nodes`). The tracer also records what each module it traced
through returned, so that a module's name means that module's output, container and all, and
tracing leaves the model's buffers and attributes as they were.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.utils._pytree as pytree
from torch import fx, nn

from featurescope._torch_utils import training_mode
from featurescope.tap._untouched import untouched

__all__ = ["ModuleOutput", "Trace", "name_nodes", "resolve_node", "trace"]


@dataclass(frozen=True)
class ModuleOutput:
    """What a module traced through returned on its first call.

    Attributes:
        leaves: the output flattened (``torch.utils._pytree``): graph nodes, or constants.
        spec: how to rebuild the container (tuple, dict, named tuple, ...) from the leaves.
        anchor: the graph's last node when the module returned: the output is taken there.
    """

    leaves: tuple[Any, ...]
    spec: pytree.TreeSpec
    anchor: fx.Node

    @property
    def node(self) -> fx.Node | None:
        """The output's node when it is one node's value (no container), else ``None``."""
        if self.spec.is_leaf() and isinstance(self.leaves[0], fx.Node):
            return self.leaves[0]
        return None

    def insert(self, graph: fx.Graph) -> fx.Node:
        """A node, right after the module returned, that rebuilds its container."""
        nodes = [leaf for leaf in self.leaves if isinstance(leaf, fx.Node)]
        leaves, spec = self.leaves, self.spec

        def module_output(*values: Any) -> Any:
            it = iter(values)
            filled = [next(it) if isinstance(leaf, fx.Node) else leaf for leaf in leaves]
            return pytree.tree_unflatten(filled, spec)

        with graph.inserting_after(self.anchor):
            return graph.call_function(module_output, tuple(nodes))


@dataclass
class Trace:
    """A traced graph of the whole model with torchvision's node name of each graph node."""

    module: fx.GraphModule
    qualnames: dict[fx.Node, str]
    training: bool
    #: ``{module path: its first call's output}`` for every module torch.fx traced through.
    module_outputs: dict[str, ModuleOutput]

    @property
    def names(self) -> list[str]:
        """Node names in execution order, as ``get_graph_node_names`` lists them."""
        return list(self.qualnames.values())

    def has(self, query: str) -> bool:
        """Whether ``query`` names a node, a module traced through, or a prefix of node names."""
        return query in self.module_outputs or resolve_node(query, self.names) is not None


def _tracer_kwargs(user: Mapping[str, Any] | None) -> dict[str, Any]:
    from torchvision.models import feature_extraction as tv_fx

    kwargs = dict(user or {})
    setter = getattr(tv_fx, "_set_default_tracer_kwargs", None)
    if setter is not None:
        return setter(kwargs)  # type: ignore[no-any-return]
    # torchvision before 0.16 had no defaults to add.
    return kwargs  # pragma: no cover


# torch.fx makes node names unique graph-wide with a ``_<n>`` suffix; names here count per module.
_FX_SUFFIX = re.compile(r"(.+)_[0-9]+$")


def name_nodes(nodes: Sequence[tuple[fx.Node, str]], module_paths: set[str]) -> dict[fx.Node, str]:
    """Name each node: a leaf module's call by its path, an op by its module's path and the op.

    torchvision strips a trailing ``_<n>`` from every name to undo torch.fx's counter, module
    paths included, so ViT's module ``encoder_layer_0.ln_1`` is named ``...ln`` and
    ``encoder_layer_0.ln_2`` is named ``...ln_1``: asking torchvision for ``ln_1`` returns
    ``ln_2``'s output. Here a module's first call is always named by its exact path, its later
    calls ``path_1``, ``path_2``, ...; the ops take what is left, counted per module as
    torchvision counts them, so an op never takes a module's name even when it comes first.

    Args:
        nodes: ``(node, path of the module it was traced in)`` in execution order.
        module_paths: every module path of the model.

    Returns:
        ``{node: name}`` in execution order.

    Example:
        >>> g = fx.Graph()
        >>> x = g.placeholder("x"); op = g.call_method("relu", (x,)); m = g.call_module("relu", (x,))
        >>> list(name_nodes([(x, ""), (op, ""), (m, "relu")], {"", "relu"}).values())
        ['x', 'relu_1', 'relu']
    """
    used: set[str] = set()
    names: dict[fx.Node, str] = {}
    calls: dict[str, int] = {}
    for node, path in nodes:
        if node.op != "call_module":
            continue
        index = calls.get(path, 0)
        name = path if index == 0 else f"{path}_{index}"
        while name in used or (index > 0 and name in module_paths):
            index += 1
            name = f"{path}_{index}"
        calls[path] = index + 1
        used.add(name)
        names[node] = name
    counters: dict[str, int] = {}
    for node, path in nodes:
        if node.op == "call_module":
            continue
        match = _FX_SUFFIX.match(node.name)
        op = match.group(1) if match else node.name
        base = f"{path}.{op}" if path else op
        index = counters.get(base, 0)
        name = base if index == 0 else f"{base}_{index}"
        while name in used or name in module_paths:
            index += 1
            name = f"{base}_{index}"
        counters[base] = index + 1
        used.add(name)
        names[node] = name
    return {node: names[node] for node, _ in nodes}


@functools.cache
def _tracer_class() -> type[Any]:
    """torchvision's ``NodePathTracer``, naming nodes by :func:`name_nodes` and keeping outputs."""
    from torchvision.models.feature_extraction import NodePathTracer

    class _NodePathTracer(NodePathTracer):  # type: ignore[misc]
        def trace(self, root: Any, *args: Any, **kwargs: Any) -> fx.Graph:
            self._scopes: list[tuple[fx.Node, str]] = []
            self.module_outputs: dict[str, ModuleOutput] = {}
            graph = super().trace(root, *args, **kwargs)
            paths = (
                {name for name, _ in root.named_modules()} if isinstance(root, nn.Module) else set()
            )
            self.node_to_qualname = name_nodes(self._scopes, paths)
            return graph  # type: ignore[no-any-return]

        def call_module(
            self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any
        ) -> Any:
            out = super().call_module(m, forward, args, kwargs)
            path = self.path_of_module(m)
            if path not in self.module_outputs:
                leaves, spec = pytree.tree_flatten(out)
                leaves = [leaf.node if isinstance(leaf, fx.Proxy) else leaf for leaf in leaves]
                if any(isinstance(leaf, fx.Node) for leaf in leaves):
                    anchor = next(iter(reversed(self.graph.nodes)))
                    self.module_outputs[path] = ModuleOutput(tuple(leaves), spec, anchor)
            return out

        def _get_node_qualname(self, module_qualname: str, node: fx.Node) -> str:
            # Named once the whole graph is known: a module's path is its own even where an op
            # of the same name comes first.
            self._scopes.append((node, module_qualname))
            return node.name

    return _NodePathTracer


def _constant(value: Any) -> Callable[[], Any]:
    def tensor_constant() -> Any:
        return value

    return tensor_constant


def _attr(obj: Any, target: str) -> Any:
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def trace(
    model: nn.Module,
    training: bool,
    tracer_kwargs: Mapping[str, Any] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> Trace:
    """Trace ``model`` in one mode, leaving its buffers, attributes and modes as they were.

    Raises:
        Exception: whatever torch.fx raises when the model cannot be traced (e.g.
            ``TraceError`` for a branch on a tensor's value); callers decide what to do.
    """
    tracer = _tracer_class()(**_tracer_kwargs(tracer_kwargs))
    added: dict[str, Any] = {}
    # In the model's own mode each submodule keeps its own flag (a frozen norm stays frozen).
    mode = (
        contextlib.nullcontext() if model.training == training else training_mode(model, training)
    )
    with untouched(model, added), mode:
        graph = tracer.trace(model, concrete_args=concrete_args)
        module = fx.GraphModule(tracer.root, graph, type(model).__name__)
    qualnames = dict(tracer.node_to_qualname)
    replaced = _detach_constants(module, added)
    qualnames = {replaced.get(n, n): q for n, q in qualnames.items()}
    outputs = {
        path: ModuleOutput(
            tuple(
                replaced.get(leaf, leaf) if isinstance(leaf, fx.Node) else leaf
                for leaf in out.leaves
            ),
            out.spec,
            replaced.get(out.anchor, out.anchor),
        )
        for path, out in tracer.module_outputs.items()
    }
    return Trace(module, qualnames, training, outputs)


def _detach_constants(module: fx.GraphModule, added: Mapping[str, Any]) -> dict[fx.Node, fx.Node]:
    """Read the attributes tracing set on the model (tensor constants) from the graph instead.

    The program's code runs on the model itself, which no longer holds them.

    Returns:
        ``{get_attr node: the node that replaced it}``.
    """
    graph = module.graph
    replaced = {}
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        target = str(node.target)
        if target.split(".")[0] not in added:
            continue
        with graph.inserting_before(node):
            constant = graph.call_function(_constant(_attr(module, target)), ())
        node.replace_all_uses_with(constant)
        graph.erase_node(node)
        replaced[node] = constant
    return replaced


def resolve_node(query: str, names: list[str]) -> str | None:
    """The node a ``return_nodes`` key means, as torchvision reads it.

    An exact node name means that node; a prefix up to a dot (``"conv1"``, a module that
    torch.fx traced through) means the last node under it in execution order.

    Example:
        >>> names = ["x", "conv1.0", "conv1.1", "conv1.2", "conv10"]
        >>> resolve_node("conv1", names), resolve_node("conv1.1", names), resolve_node("conv", names)
        ('conv1.2', 'conv1.1', None)
    """
    if query in names:
        return query
    pattern = re.compile(rf"^{re.escape(query)}(\.|$)")
    matches = [name for name in names if pattern.match(name)]
    return matches[-1] if matches else None
