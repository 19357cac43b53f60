"""FeatureTap on the patterns issue 21 found wrong: containers, names, node lists, side effects.

Each model is the smallest that shows one pattern; each value is compared with an eager forward
that clones it when computed (``tests/_tap_reference.py``), in both backends and both modes.
"""

from __future__ import annotations

import collections
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import _tap_reference as ref
from featurescope import FeatureTap
from featurescope.errors import FeaturescopeWarning
from featurescope.tap import tappable_nodes
from featurescope.tap._trace import trace

Pair = collections.namedtuple("Pair", "first second")


class ChunkJoin(nn.Module):
    """``parts = y.chunk(2, 1) + (y,)``, then ``parts[0]`` written in place."""

    def __init__(self, returns: str) -> None:
        super().__init__()
        self.returns = returns
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        parts = y.chunk(2, 1) + (y,)  # noqa: RUF005 (the join is the pattern under test)
        parts[0].relu_()
        if self.returns == "y":  # reads the written storage through y
            return self.head(parts[2])
        return parts[1].sum()  # the write is dead code unless something reads y


class NamedLeaf(nn.Module):
    def forward(self, x: torch.Tensor) -> Pair:
        return Pair(x * 2, x + 1)


class Containers(nn.Module):
    """An LSTM's output, a leaf's named tuple and ``torch.max``'s values, each written later."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.named = NamedLeaf()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        out.relu_()
        pair = self.named(out)
        pair.first.mul_(-1)
        top = torch.max(pair.second, 1)
        top.values.neg_()
        return self.linear(top.values)


class NameClash(nn.Module):
    """An op named ``relu`` comes before the module ``relu`` in the same scope."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.relu() * 2
        return self.conv(self.relu(x - 0.5) + y)


class Backbone(nn.Module):
    """Traced through, returns an OrderedDict (as torchvision's IntermediateLayerGetter)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.conv1(x)
        return collections.OrderedDict(low=a, high=self.conv2(a).relu())


class Segmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        return self.act(features["low"]) + features["high"]


CASES = {
    "chunk_join_y": (lambda: ChunkJoin("y"), (2, 3, 4, 4)),
    "chunk_join_sum": (lambda: ChunkJoin("sum"), (2, 3, 4, 4)),
    "containers": (Containers, (2, 3, 4)),
    "name_clash": (NameClash, (2, 3, 4, 4)),
    "segmenter": (Segmenter, (2, 3, 4, 4)),
}


def _expected(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Every module call and every graph node of the model's mode, cloned when computed."""
    calls = ref.module_calls(model, x.clone())
    traced = trace(model, model.training)
    snapshots = ref.node_snapshots(traced.module, traced.qualnames, x.clone())
    nodes = {q: n for n, q in traced.qualnames.items()}
    return {**calls, **{q: ref.expected_value(q, nodes[q], calls, snapshots) for q in nodes}}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_every_node_and_module_is_its_eager_value(case: str, backend: str, training: bool) -> None:
    build, shape = CASES[case]
    model = build().train(training)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = _expected(model, x)
        modules = [n for n, _ in model.named_modules() if n and n in expected]  # that ran
        nodes = tappable_nodes(model, backend) if backend == "fx" else []
        for request in (nodes, modules, modules[-1:], nodes[1::3]):
            if not request:
                continue
            got = FeatureTap(model, request, backend=backend)(x.clone())
            wrong = [n for n in request if not ref.same(got[n], expected[n])]
            assert not wrong, f"{backend} differs from eager on {wrong} (asked for {request})"


def test_a_copied_named_tuple_and_return_types_keep_their_type() -> None:
    model = Containers().eval()
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        expected = _expected(model, x)
        for backend in ("fx", "hooks"):
            named = FeatureTap(model, ["named", "linear"], backend=backend)(x)["named"]
            assert type(named) is Pair and ref.same(named, expected["named"])
        tap = FeatureTap(model, ["max", "linear"], backend="fx")
        assert "max" in tap.copied
        top = tap(x)["max"]
        assert type(top) is torch.return_types.max
        assert ref.same(top, expected["max"])


def test_a_module_first_call_takes_its_exact_path_before_a_same_named_op() -> None:
    model = NameClash().eval()
    names = tappable_nodes(model)
    assert names.index("relu_1") < names.index(
        "relu"
    )  # the op came first, the module keeps its name
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        fx_out = FeatureTap(model, ["relu"], backend="fx")(x)["relu"]
        hooks_out = FeatureTap(model, ["relu"], backend="hooks")(x)["relu"]
    assert ref.same(fx_out, torch.relu(x - 0.5)) and ref.same(hooks_out, fx_out)


def test_a_module_name_returns_the_module_output_container_and_all() -> None:
    model = Segmenter().eval()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        fx_out = FeatureTap(model, ["backbone", "act"], backend="fx")(x)["backbone"]
        hooks_out = FeatureTap(model, ["backbone", "act"], backend="hooks")(x)["backbone"]
        eager = ref.clone(model.backbone(x))
    assert type(fx_out) is collections.OrderedDict and list(fx_out) == ["low", "high"]
    assert ref.same(fx_out, eager) and ref.same(hooks_out, eager)


class EvalOnlyBranch(nn.Module):
    """Averages two heads in eval mode only, as timm's LeViT and EfficientFormer do."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.dist = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> Any:
        a, b = self.head(x), self.dist(x)
        if self.training:
            return a, b
        return (a + b) / 2


class DataDependent(nn.Module):
    """Untraceable (a branch on a value), with a module that never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.drop = nn.Dropout(0.5)  # never called, as a fused attention's attn_drop
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.act(y) if y.abs().sum() >= 0 else self.drop(y)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("build", [EvalOnlyBranch, DataDependent])
def test_the_tap_takes_its_own_node_list(build: type[nn.Module], training: bool) -> None:
    model = build().train(training)
    x = torch.randn(2, 4) if build is EvalOnlyBranch else torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FeaturescopeWarning)  # the fallback to hooks
        nodes = tappable_nodes(model, example_inputs=(x,))
        tap = FeatureTap(model, nodes)
    with torch.no_grad():
        got = tap(x.clone())
        expected = _expected(model, x) if tap.backend == "fx" else ref.module_calls(model, x)
    assert nodes and all(ref.same(got[n], expected[n]) for n in nodes)
    if build is DataDependent:
        assert tap.backend == "hooks" and nodes == ["conv", "act"]
    else:
        assert "add" not in nodes  # the eval-only node: FeatureTap would refuse it in training


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[Any]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [(n, sorted(vars(m)), m.training) for n, m in model.named_modules()]


def _assert_untouched(model: nn.Module, before: tuple[dict[str, torch.Tensor], list[Any]]) -> None:
    state, attributes = _snapshot(model)
    assert attributes == before[1]
    assert [k for k, v in before[0].items() if not torch.equal(state[k], v)] == []


class Counting(nn.BatchNorm2d):
    """As timm's BatchNormAct2d: not a torch.nn leaf, so traced through, bumping its counter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        bn = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum or 0.0,
            self.eps,
        )
        return bn + torch.tensor([0.5])  # a tensor constant for torch.fx


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_listing_nodes_and_building_a_tap_leave_the_model_as_it_was(training: bool) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Counting(4), nn.ReLU()).train(training)
    model[1].eval()  # a frozen norm inside a training model stays frozen
    before = _snapshot(model)
    x = torch.randn(2, 3, 4, 4)
    nodes = tappable_nodes(model)
    hooks = tappable_nodes(model, "hooks", example_inputs=(x,))
    taps = [FeatureTap(model, nodes), FeatureTap(model, hooks, backend="hooks")]
    _assert_untouched(model, before)
    with torch.no_grad():
        reference = model(x)
        assert ref.same(taps[0](x)[nodes[-1]], reference)
