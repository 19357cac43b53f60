"""Each behaviour of torchvision's ``TestFxFeatureExtraction``, with FeatureTap in place of
``create_feature_extractor`` (torchvision ``test/test_backbone_utils.py``).

Where FeatureTap differs on purpose (its errors, its in-place safety, the model it keeps whole)
the test says so; ``docs/tap.rst`` has the table. Values are compared with torchvision's own
extractor asked for one node at a time: its graph then ends at that node, so no later in-place
op can have changed what it returns.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping, Sequence

import pytest
import torch
from torch import nn
from torchvision import models
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import StochasticDepth

from featurescope.errors import FeaturescopeError, NodeNotFoundError
from featurescope.tap import FeatureTap, get_graph_node_names

# A sample across the families of torchvision's classifiers: residual, depthwise (in-place
# Hardswish), fire modules, channel shuffle, an auxiliary head in training only, squeeze and
# excitation with stochastic depth, layer scale read with get_attr.
SAMPLE = [
    "resnet18",
    "mobilenet_v3_small",
    "squeezenet1_1",
    "shufflenet_v2_x0_5",
    "googlenet",
    "efficientnet_b0",
    "convnext_tiny",
]
INPUT = (2, 3, 64, 64)
# torchvision's filter: nodes that do not return tensors.
EXCLUDE = ["getitem", "floordiv", "size", "chunk", "_assert", "eq", "dim", "getattr"]


# One torch thread per test (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def leaf_function(x: int) -> int:
    return int(x)


class NamingSubModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 1
        x = x + 1
        x = self.relu(x)
        return self.relu(x)


class NamingModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.submodule = NamingSubModule()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.submodule(x)
        x = x + 1
        x = x + 1
        x = self.relu(x)
        return self.relu(x)


TEST_MODULE_NODES = [
    "x",
    "submodule.add",
    "submodule.add_1",
    "submodule.relu",
    "submodule.relu_1",
    "add",
    "add_1",
    "relu",
    "relu_1",
]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # GoogLeNet's notice on its init
        model = models.get_model(name, weights=None, num_classes=3)
    for module in model.modules():  # no randomness, so training-mode values can be compared
        if isinstance(module, (nn.Dropout, StochasticDepth)):
            module.p = 0.0
    return model


def sample_nodes(model: nn.Module, k: int = 6) -> tuple[list[str], list[str]]:
    train_nodes, eval_nodes = get_graph_node_names(model)
    train_nodes = [n for n in train_nodes if not any(x in n for x in EXCLUDE)]
    eval_nodes = [n for n in eval_nodes if not any(x in n for x in EXCLUDE)]
    rng = random.Random(0)
    return rng.sample(train_nodes, k), rng.sample(eval_nodes, k)


def one_node_reference(model: nn.Module, node: str, x: torch.Tensor) -> object:
    extractor = create_feature_extractor(
        model, train_return_nodes=[node], eval_return_nodes=[node], suppress_diff_warning=True
    )
    extractor.train(model.training)
    with torch.no_grad():
        return extractor(x)[node]


def aggregate(outputs: Mapping[str, object]) -> torch.Tensor:
    """torchvision's sum of means over tensors, sequences and mappings of tensors."""
    total = torch.zeros(())
    for value in outputs.values():
        if isinstance(value, Sequence):
            total = total + sum(v.mean() for v in value if v is not None)
        elif isinstance(value, Mapping):
            total = total + sum(v.mean() for v in value.values() if v is not None)
        else:
            assert isinstance(value, torch.Tensor)
            total = total + value.mean()
    return total


def test_node_name_conventions():
    train_nodes, eval_nodes = get_graph_node_names(NamingModule())
    assert train_nodes == eval_nodes == TEST_MODULE_NODES
    x = torch.rand(2, 3)
    out = FeatureTap(NamingModule(), TEST_MODULE_NODES)(x)
    expected = [x, x + 1, x + 2, x + 2, x + 2, x + 3, x + 4, x + 4, x + 4]
    assert list(out) == TEST_MODULE_NODES
    for name, want in zip(TEST_MODULE_NODES, expected, strict=True):
        torch.testing.assert_close(out[name], want)


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLE)
def test_build_forward_and_backward_as_torchvision(name):
    model = build(name).eval()
    train_nodes, eval_nodes = sample_nodes(model)
    x = torch.rand(*INPUT)

    # A list and a dict of nodes give torchvision's keys in each mode.
    listed = FeatureTap(model, train_return_nodes=train_nodes, eval_return_nodes=eval_nodes)
    named = FeatureTap(
        model, train_return_nodes={n: n for n in train_nodes}, eval_return_nodes=eval_nodes
    )
    tv = create_feature_extractor(
        model,
        train_return_nodes=train_nodes,
        eval_return_nodes=eval_nodes,
        suppress_diff_warning=True,
    )
    for training in (False, True):
        listed.train(training)  # trains the model, so named and tv follow (shared modules)
        with torch.no_grad():
            keys = list(tv.train(training)(x))  # in graph order
            mine = list(listed(x))  # in the order asked for
            assert mine == list(named(x)) == (train_nodes if training else eval_nodes)
            assert sorted(mine) == sorted(keys)
        assert model.training is named.model.training is training

    # Values in each mode: each node's own output, before any later in-place op.
    for training, nodes in ((False, eval_nodes), (True, train_nodes)):
        model.train(training)
        with torch.no_grad():
            out = listed(x)
        for node in nodes:
            torch.testing.assert_close(out[node], one_node_reference(model, node, x))

    # Forward and backward in training mode, as torchvision's test_forward_backward.
    model.train()
    model.zero_grad()
    aggregate(listed(x)).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_return_nodes_arguments_are_checked_as_torchvision_does():
    # torchvision asserts (AssertionError); FeatureTap raises FeaturescopeError with a fix.
    model = build("resnet18")
    train_nodes, _ = sample_nodes(model)
    with pytest.raises(FeaturescopeError, match="needs the nodes"):
        FeatureTap(model)
    with pytest.raises(FeaturescopeError, match="not both"):
        FeatureTap(model, train_nodes, train_return_nodes=train_nodes)
    with pytest.raises(FeaturescopeError, match="needs eval_return_nodes"):
        FeatureTap(model, train_return_nodes=train_nodes)


def test_invalid_node_name():
    # torchvision raises ValueError; NodeNotFoundError is a KeyError (an unknown name) that
    # names the closest nodes.
    model = build("resnet18")
    assert not any(n == "l" or n.startswith("l.") for n in get_graph_node_names(model)[0])
    with pytest.raises(NodeNotFoundError, match="'l'.*get_graph_node_names"):
        FeatureTap(model, train_return_nodes=["l"], eval_return_nodes=["l"])


def test_feature_extraction_methods_equivalence():
    model = build("resnet18").eval()
    return_layers = {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}
    ilg = IntermediateLayerGetter(model, return_layers).eval()
    tap = FeatureTap(model, return_layers)

    # The same parameters, the same objects: the tap keeps the whole model under "model."
    # (IntermediateLayerGetter, like torchvision's extractor, keeps copies of the used part).
    tap_params = dict(tap.named_parameters())
    for name, param in ilg.named_parameters():
        assert tap_params[f"model.{name}"] is param
    # The model's own names start with IntermediateLayerGetter's (which drops avgpool and fc).
    ilg_names = [n for n, _ in ilg.named_parameters()]
    assert [n for n, _ in tap.model.named_parameters()][: len(ilg_names)] == ilg_names

    x = torch.rand(*INPUT)
    with torch.no_grad():
        ilg_out, tap_out = ilg(x), tap(x)
    assert list(ilg_out) == list(tap_out)
    for key in ilg_out:
        assert ilg_out[key].equal(tap_out[key])


def test_torchscript_is_documented_as_unsupported():
    # torchvision scripts its extractor; FeatureTap says what to use instead.
    tap = FeatureTap(build("resnet18"), ["layer1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation, if any
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(FeaturescopeError, match="TorchScript"):
            torch.jit.script(tap)


class TrainEvalModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean()
        x = self.dropout(x)  # dropout
        if self.training:
            x += 100  # add
        else:
            x *= 0  # mul
        x -= 0  # sub
        return x


def _checks(tap: FeatureTap, mode: str) -> None:
    with torch.no_grad():
        out = tap(torch.ones(10, 10))
    if mode == "train":
        assert out["dropout"].item() == 0  # dropout is respected
        assert out["sub"].item() == 100  # control flow on self.training is respected
        assert "add" in out and "mul" not in out
    else:
        assert out["dropout"].item() == 1
        assert out["sub"].item() == 0
        assert "mul" in out and "add" not in out


@pytest.mark.parametrize("start", ["train", "eval"])
def test_train_eval(start):
    model = TrainEvalModel().train(start == "train")
    tap = FeatureTap(
        model,
        train_return_nodes=["dropout", "add", "sub"],
        eval_return_nodes=["dropout", "mul", "sub"],
    )
    # The model and the tap stay in the model's mode.
    assert model.training is tap.training is (start == "train")
    _checks(tap, start)
    other = "eval" if start == "train" else "train"
    tap.train(other == "train")
    _checks(tap, other)


def test_leaf_module_and_function():
    class LeafModule(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            int(x.shape[0])  # a TypeError under torch.fx unless this is a leaf module
            return nn.functional.relu(x + 4)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 1, 3)
            self.leaf_module = LeafModule()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            leaf_function(x.shape[0])
            x = self.conv(x)
            return self.leaf_module(x)

    tracer_kwargs = {"leaf_modules": [LeafModule], "autowrap_functions": [leaf_function]}
    model = Model().train()
    tap = FeatureTap(model, ["leaf_module"], tracer_kwargs=tracer_kwargs, backend="fx")
    train_nodes, _ = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    assert "leaf_module" in train_nodes and not any("relu" in n for n in train_nodes)
    assert "leaf_function" in train_nodes
    x = torch.rand(2, 3, 8, 8)
    out = tap(x)
    torch.testing.assert_close(out["leaf_module"], model(x))
    out["leaf_module"].mean().backward()
    assert model.conv.weight.grad is not None
