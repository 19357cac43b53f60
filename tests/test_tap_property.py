"""FeatureTap on small random networks built from the awkward patterns real code has.

Each network is a short program of steps over registers of tensors and containers: convolutions
(modules called twice), in-place writes (modules, methods, ``x[i] = y``, through views and
through the elements of tuples, dicts and named tuples), tuples joined and repeated, ``torch.max``
(a ``torch.return_types`` value), a leaf module returning a tuple, a module traced through that
returns a named tuple or a dict, an op named like a module before that module, a branch on
``self.training`` (an eval-only node), a branch on a tensor's value (torch.fx cannot trace it:
the hooks backend takes over) and a dict input. Every node ``tappable_nodes`` lists, in the
model's mode, is tapped (all at once and a random subset, which the fx backend prunes
differently) and compared bit for bit with an eager reference that clones each value when it is
computed (``tests/_tap_reference.py``); so is every module name, through both backends.
"""

from __future__ import annotations

import collections
import random
from typing import Any

import pytest
import torch
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from torch import nn

import _tap_reference as ref
from featurescope import FeatureTap
from featurescope.errors import FeaturescopeError
from featurescope.tap import tappable_nodes
from featurescope.tap._trace import trace

Halves = collections.namedtuple("Halves", "low high")

KINDS = (
    "conv",
    "relu_module",
    "relu_op",
    "inplace_module",
    "inplace_method",
    "view_write",
    "setitem",
    "add",
    "bn",
    "chunk_join",
    "repeat",
    "dict",
    "max",
    "pool_indices",
    "pair",
    "element",
    "element_write",
    "train_only",
    "value_branch",
)
Step = tuple[str, int, int]


class Pair(nn.Module):
    """Traced through (not a leaf): returns a named tuple or a dict of two tensors."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> Any:
        y = self.conv(x)
        if self.as_dict:
            return {"conv": y, "input": x}
        return Halves(y, x * 2)


class Program(nn.Module):
    """Runs ``steps`` on registers; see the module docstring."""

    def __init__(self, steps: list[Step], dict_input: bool, pair_as_dict: bool) -> None:
        super().__init__()
        self.steps = steps
        self.dict_input = dict_input
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(2))
        self.relu = nn.ReLU()  # its name is also an op's ("relu_op")
        self.act = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(1, return_indices=True)  # a leaf returning a tuple
        self.pair = Pair(pair_as_dict)
        self.unused = nn.Conv2d(4, 4, 1)  # never runs

    def forward(self, x: Any) -> Any:
        tensors: list[torch.Tensor] = [x["image"] if self.dict_input else x]
        containers: list[tuple[str, Any]] = []
        for kind, i, j in self.steps:
            a, b = tensors[i % len(tensors)], tensors[j % len(tensors)]
            if kind in CONTAINERS:
                containers.append((kind, self._container(kind, a, b)))
            elif kind in ("element", "element_write") and containers:
                element = _element(*containers[i % len(containers)], j)
                if kind == "element_write":
                    element.mul_(-1)
                tensors.append(element)
            else:
                tensors.append(self._step(kind, a, b, j))
        return tensors[-1], containers[-1][1] if containers else None

    def _container(self, kind: str, a: torch.Tensor, b: torch.Tensor) -> Any:
        # Tensors split along the batch keep 4 channels, so every step takes every tensor.
        if kind == "chunk_join":
            return a.chunk(2, 0) + (b,)  # noqa: RUF005 (the join is the pattern under test)
        if kind == "repeat":
            return a.chunk(2, 0) * 2
        if kind == "dict":
            return {"a": a, "b": b}
        if kind == "max":
            return torch.max(a, 0, keepdim=True)
        if kind == "pool_indices":
            return self.pool(a)
        return self.pair(a)

    def _step(self, kind: str, a: torch.Tensor, b: torch.Tensor, j: int) -> torch.Tensor:
        if kind == "conv":
            return self.convs[j % 2](a)
        if kind == "relu_module":
            return self.relu(a)
        if kind == "relu_op":
            return a.relu() * 2
        if kind == "inplace_module":
            return self.act(a)
        if kind == "inplace_method":
            return a.add_(1) if j % 3 == 0 else a.relu_() if j % 3 == 1 else a.mul_(-1)
        if kind == "view_write":
            a[:, :2].mul_(-2)  # through a view, into a
            return a
        if kind == "setitem":
            a[:, 1] = b[:, 0].mean(0)
            return a
        if kind == "add":
            return a + b
        if kind == "bn":
            return self.bn(a)
        if kind == "train_only":
            return a * 0.5 if self.training else a.sigmoid()
        if kind == "value_branch":
            return self.convs[0](a) if a.sum() > 0 else a * 3
        return a  # "element" before any container: nothing to take


CONTAINERS = ("chunk_join", "repeat", "dict", "max", "pool_indices", "pair")


def _element(kind: str, container: Any, j: int) -> torch.Tensor:
    """One tensor of a container, taken the way code takes it from that kind of container."""
    if kind == "chunk_join":
        return container[j % 3]  # type: ignore[no-any-return]
    if kind == "repeat":
        return container[j % 4]  # type: ignore[no-any-return]
    if kind == "dict":
        return container["a" if j % 2 else "b"]  # type: ignore[no-any-return]
    if kind == "max":
        return container.values  # type: ignore[no-any-return]
    if kind == "pool_indices":
        return container[0]  # type: ignore[no-any-return]
    if isinstance(container, dict):
        return container["conv" if j % 2 else "input"]  # type: ignore[no-any-return]
    return container.high if j % 2 else container.low  # type: ignore[no-any-return]


def _input(dict_input: bool) -> Any:
    x = torch.randn(2, 4, 3, 3)
    return {"image": x} if dict_input else x


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[Any]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = [(name, sorted(vars(m)), m.training) for name, m in model.named_modules()]
    return state, attributes


def _unchanged(before: tuple[dict[str, torch.Tensor], list[Any]], model: nn.Module) -> bool:
    state, attributes = _state(model)
    return attributes == before[1] and all(torch.equal(state[k], v) for k, v in before[0].items())


def _check(steps: list[Step], dict_input: bool, pair_as_dict: bool, training: bool, seed: int):
    torch.manual_seed(seed)
    model = Program(steps, dict_input, pair_as_dict).train(training)
    x0 = _input(dict_input)

    def fresh() -> Any:  # the network writes into its input in place
        return ref.clone(x0)

    with torch.no_grad():
        calls = ref.module_calls(model, fresh())
        before = _state(model)
        try:
            traced = trace(model, training)
        except Exception:  # a branch on a tensor's value
            traced = None
        nodes = tappable_nodes(model, example_inputs=(fresh(),))
        hooks_nodes = tappable_nodes(model, "hooks", example_inputs=(fresh(),))
        modules = [n for n, _ in model.named_modules() if n and n in calls]
        hooks_request = [*hooks_nodes, "pair"] if "pair" in calls else hooks_nodes
        taps = {}
        if hooks_request:
            taps["hooks"] = FeatureTap(model, hooks_request, backend="hooks")
        if traced is not None and nodes:
            taps["fx"] = FeatureTap(model, nodes, backend="fx")
            if modules:
                taps["fx modules"] = FeatureTap(model, modules, backend="fx")
            subset = random.Random(seed).sample(nodes, k=max(1, len(nodes) // 3))
            taps["fx subset"] = FeatureTap(model, subset, backend="fx")
        elif traced is None:
            with pytest.raises(FeaturescopeError):
                FeatureTap(model, nodes, backend="fx")
            assert nodes == hooks_nodes
        assert _unchanged(before, model), "listing nodes or building a tap changed the model"
        assert "unused" not in hooks_nodes and set(hooks_nodes) <= set(calls)

        expected: dict[str, Any] = dict(calls)
        if traced is not None:
            snapshots = ref.node_snapshots(traced.module, traced.qualnames, fresh())
            by_name = {q: n for n, q in traced.qualnames.items()}
            expected.update({q: ref.expected_value(q, by_name[q], calls, snapshots) for q in nodes})
        for backend, tap in taps.items():
            got = tap(fresh())
            wrong = [a for a in got if not ref.same(got[a], expected[a])]
            assert not wrong, f"{backend}: {wrong} differ from eager"


STEPS = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=8
)


@settings(
    max_examples=30,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
)
@given(
    steps=STEPS,
    dict_input=st.booleans(),
    pair_as_dict=st.booleans(),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(  # the tuple: parts[0] written in place after parts = y.chunk(2, 1) + (y,)
    steps=[("conv", 0, 0), ("chunk_join", 1, 1), ("element_write", 0, 0)],
    dict_input=False,
    pair_as_dict=False,
    training=False,
    seed=0,
)
@example(  # an LSTM-like leaf returning a tuple, its output written in place later
    steps=[("pool_indices", 0, 0), ("element", 0, 0), ("inplace_method", 1, 1), ("conv", 2, 0)],
    dict_input=True,
    pair_as_dict=False,
    training=True,
    seed=1,
)
@example(  # an op named relu before the module relu
    steps=[("relu_op", 0, 0), ("relu_module", 0, 0), ("train_only", 1, 1)],
    dict_input=False,
    pair_as_dict=True,
    training=True,
    seed=2,
)
@example(  # found by the generator when hooks guarded single tensors only: a dict output
    steps=[("pair", 0, 0), ("inplace_module", 0, 0)],
    dict_input=False,
    pair_as_dict=True,
    training=False,
    seed=0,
)
def test_every_tappable_node_of_a_random_network_is_its_eager_value(
    steps: list[Step], dict_input: bool, pair_as_dict: bool, training: bool, seed: int
) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check(steps, dict_input, pair_as_dict, training, seed)
    finally:
        torch.set_num_threads(threads)
