"""FeatureTap as an nn.Module: it shares, moves, nests, trains, follows the mode, compiles, exports."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from _distributed import gloo_group, spawn_ranks
from featurescope.errors import FeaturescopeError, FeaturescopeWarning, NodeNotFoundError
from featurescope.tap import FeatureTap
from featurescope.tap._tap import EXPORT_DETECTABLE

NODES = {"0": "conv", "1": "relu", "4": "logits"}


def tiny_model() -> nn.Module:
    """Conv, in-place ReLU (so "0" must be copied), conv, flatten, linear; 8x8 inputs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


def tiny_reference(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The eager forward, each output cloned before the next layer can write into it."""
    conv = model[0](x)
    relu = F.relu(conv.clone())
    logits = model[4](torch.flatten(model[2](relu.clone()), 1))
    return {"conv": conv, "relu": relu, "logits": logits}


class Normalized(nn.Module):
    """Reads a buffer and a parameter of a module torch.fx traces through (``get_attr``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((3, 1, 1), 0.5))
        self.gain = nn.Parameter(torch.full((3, 1, 1), 2.0))
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv((x - self.mean) * self.gain)


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Normalized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).relu()


class Branchy(nn.Module):
    """Different graphs in training and eval, and dropout that is active only in training."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.dropout = nn.Dropout(p=1.0)
        self.train_head = nn.Linear(4, 2)
        self.eval_head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.stem(x))
        if self.training:
            return self.train_head(h)
        return self.eval_head(h)


def assert_outputs_equal(actual: dict, expected: dict, **tolerance: float) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **tolerance)


# --- a module that shares the model -------------------------------------------------------


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_tap_is_a_module_whose_one_submodule_is_the_model_itself(backend):
    model = tiny_model()
    tap = FeatureTap(model, NODES, backend=backend)
    assert isinstance(tap, nn.Module)
    assert dict(tap.named_children()) == {"model": model}
    assert tap.model is model
    assert [id(p) for p in tap.parameters()] == [id(p) for p in model.parameters()]
    assert [n for n, _ in tap.named_parameters()] == [
        f"model.{n}" for n, _ in model.named_parameters()
    ]
    state, own = tap.state_dict(), model.state_dict()
    assert list(state) == [f"model.{k}" for k in own]
    assert all(state[f"model.{k}"].data_ptr() == v.data_ptr() for k, v in own.items())
    assert "backend='" + backend + "'" in repr(tap) and "Conv2d" in repr(tap)


def test_load_state_dict_through_the_tap_changes_the_models_weights():
    model = tiny_model()
    tap = FeatureTap(model, NODES)
    other = tiny_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    tap.load_state_dict({f"model.{k}": v for k, v in other.state_dict().items()})
    x = torch.randn(2, 3, 8, 8)
    assert_outputs_equal(tap(x), tiny_reference(other, x))
    with pytest.raises(RuntimeError, match="Missing key"):
        tap.load_state_dict(other.state_dict())  # the model's own keys lack the prefix


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_to_moves_the_model_and_the_tap_follows(backend):
    model = Wrapper().eval()
    tap = FeatureTap(model, {"body.conv": "conv"}, backend=backend)
    assert tap.to(torch.float64) is tap
    assert model.body.mean.dtype == model.body.conv.weight.dtype == torch.float64
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    out = tap(x)["conv"]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, model.body(x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_to_cuda_moves_the_model_and_the_tap_follows(backend):
    model = Wrapper().eval()
    tap = FeatureTap(model, {"body.conv": "conv"}, backend=backend).to("cuda")
    assert model.body.mean.is_cuda and model.body.conv.weight.is_cuda
    x = torch.randn(2, 3, 6, 6, device="cuda")
    torch.testing.assert_close(tap(x)["conv"], model.body(x))
    tap.cpu()
    torch.testing.assert_close(tap(x.cpu())["conv"], model.body(x.cpu()))


def test_fx_tap_reads_buffers_and_parameters_the_model_replaced():
    # The graph reads body.mean and body.gain with get_attr; the model swaps both objects.
    model = Wrapper().eval()
    tap = FeatureTap(model, {"body.conv": "conv"}, backend="fx")
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model.body.mean = torch.full((3, 1, 1), -3.0)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(tap(x)["conv"], model.body(x))


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_deepcopy_of_a_tap_taps_the_copy_of_the_model(backend):
    # As an EMA or a frozen teacher copies a model that holds a tap.
    model = tiny_model().eval()
    tap = FeatureTap(model, NODES, backend=backend)
    twin = copy.deepcopy(tap)
    assert twin.model is not model
    with torch.no_grad():
        for p in twin.model.parameters():
            p.mul_(-1.0)
    x = torch.randn(2, 3, 8, 8)
    assert_outputs_equal(twin(x), tiny_reference(twin.model, x))
    assert_outputs_equal(tap(x), tiny_reference(model, x))


def test_rejected_call_leaves_the_model_untouched():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    children = list(model.named_children())
    with pytest.raises(NodeNotFoundError):
        FeatureTap(model, ["nope"])
    with pytest.raises(FeaturescopeError):
        FeatureTap(model, ["0"], train_return_nodes=["0"], eval_return_nodes=["0"])
    assert list(model.named_children()) == children
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- modes --------------------------------------------------------------------------------


def test_tap_starts_in_the_models_mode_and_switches_it():
    model = Branchy().eval()
    tap = FeatureTap(model, ["stem"])
    assert not tap.training
    tap.train()
    assert model.training and all(m.training for m in model.modules())
    tap.eval()
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_separate_nodes_follow_the_models_mode(backend):
    model = Branchy()
    tap = FeatureTap(
        model,
        train_return_nodes={"dropout": "features", "train_head": "head"},
        eval_return_nodes={"dropout": "features", "eval_head": "head"},
        backend=backend,
    )
    x = torch.randn(5, 4)
    out = tap(x)
    assert out["head"].shape == (5, 2) and torch.equal(out["features"], torch.zeros(5, 4))
    assert tap.return_nodes == {"dropout": "features", "train_head": "head"}
    model.eval()  # the model itself, not the tap: the tap follows it
    out = tap(x)
    stem = model.stem(x)
    torch.testing.assert_close(out["features"], stem)
    torch.testing.assert_close(out["head"], model.eval_head(stem))
    assert tap.nodes["head"] == "eval_head"
    assert "eval_return_nodes" in repr(tap)


def test_one_node_set_must_exist_in_both_modes_and_the_error_says_what_to_do():
    with pytest.raises(NodeNotFoundError, match="only in training mode.*train_return_nodes"):
        FeatureTap(Branchy(), ["train_head"])
    with pytest.raises(NodeNotFoundError, match="only in eval mode.*eval_return_nodes only"):
        FeatureTap(Branchy(), train_return_nodes=["eval_head"], eval_return_nodes=["stem"])
    with pytest.raises(NodeNotFoundError, match="'stemm'.*Did you mean.*'stem'"):
        FeatureTap(Branchy(), train_return_nodes=["stem"], eval_return_nodes=["stemm"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs the nodes to return"),
        ({"return_nodes": ["stem"], "eval_return_nodes": ["stem"]}, "not both"),
        ({"train_return_nodes": ["stem"]}, "train_return_nodes needs eval_return_nodes"),
        ({"eval_return_nodes": ["stem"]}, "eval_return_nodes needs train_return_nodes"),
        ({"train_return_nodes": [], "eval_return_nodes": ["stem"]}, "train_return_nodes is empty"),
        (
            {"train_return_nodes": ["stem"], "eval_return_nodes": ["stem", "stem"]},
            "eval_return_nodes names node 'stem' twice",
        ),
    ],
)
def test_node_set_arguments_are_checked(kwargs, message):
    with pytest.raises(FeaturescopeError, match=message):
        FeatureTap(Branchy(), **kwargs)


def test_summary_uses_the_eval_nodes():
    model = Branchy().train()
    tap = FeatureTap(model, train_return_nodes=["train_head"], eval_return_nodes=["eval_head"])
    rows = tap.summary(input_size=(4,), print_fn=None)
    assert [(r.node, r.output_shape, r.params) for r in rows] == [("eval_head", (-1, 3), 15)]
    assert model.training


# --- nesting and training -----------------------------------------------------------------


class Classifier(nn.Module):
    """A head on a tapped backbone: the way torchvision's detection models use an extractor."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.body = FeatureTap(backbone, {"layer3": "c4", "layer4": "c5"})
        self.head = nn.Linear(256 + 512, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        pooled = [features[k].mean(dim=(2, 3)) for k in ("c4", "c5")]
        return self.head(torch.cat(pooled, dim=1))


def resnet_reference(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    c4 = model.layer3(model.layer2(model.layer1(h)))
    return {"c4": c4, "c5": model.layer4(c4)}


@pytest.mark.slow
def test_a_head_trains_through_a_tapped_resnet18():
    torch.manual_seed(0)
    classifier = Classifier(resnet18(num_classes=10)).train()
    backbone = classifier.body.model
    assert {n.split(".")[0] for n, _ in classifier.named_parameters()} == {"body", "head"}
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])

    # The gradient through the tap is the gradient through the eager forward.
    loss = F.cross_entropy(classifier(x), y)
    tap_grads = torch.autograd.grad(loss, list(backbone.layer1.parameters()))
    ref = resnet_reference(backbone, x)
    pooled = torch.cat([ref[k].mean(dim=(2, 3)) for k in ("c4", "c5")], dim=1)
    ref_loss = F.cross_entropy(classifier.head(pooled), y)
    ref_grads = torch.autograd.grad(ref_loss, list(backbone.layer1.parameters()))
    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip(tap_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)

    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(classifier(x), y).backward()
        optimizer.step()
    moved = {n for n, p in backbone.named_parameters() if not torch.equal(p, before[n])}
    assert "conv1.weight" in moved and "layer4.1.conv2.weight" in moved
    assert not any(n.startswith("fc.") for n in moved)  # after the tapped nodes: no gradient


def _ddp_loss(features: dict[str, torch.Tensor]) -> torch.Tensor:
    return features["conv"].mean() + features["conv2"].square().mean()


def _ddp_worker(rank: int, init_method: str, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(init_method, rank, world):
        torch.set_num_threads(1)
        model = tiny_model().eval()
        reference = copy.deepcopy(model)
        # The tap keeps the whole model, and the Linear after the deepest node gets no
        # gradient, so DDP is told (without the flag the second step fails).
        ddp = DistributedDataParallel(
            FeatureTap(model, {"0": "conv", "2": "conv2"}), find_unused_parameters=True
        )
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2 * world, 3, 8, 8, generator=g)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            _ddp_loss(ddp(x[2 * rank : 2 * rank + 2])).backward()
            optimizer.step()
        # One process on the whole batch: the mean of equal halves' gradients.
        ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        for _ in range(2):
            ref_optimizer.zero_grad()
            conv = reference[0](x)
            conv2 = reference[2](F.relu(conv))
            _ddp_loss({"conv": conv, "conv2": conv2}).backward()
            ref_optimizer.step()
        for got, want in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(got, want)
        assert torch.equal(model[4].weight, tiny_model()[4].weight)  # unused, untouched


@pytest.mark.distributed
def test_ddp_on_two_gloo_ranks_trains_a_tap_like_one_process(tmp_path):
    spawn_ranks(_ddp_worker, (2,), 2, tmp_path)


# --- compile, export, TorchScript ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_compiled_tap_gives_the_taps_outputs(backend):
    model = tiny_model().eval()
    tap = FeatureTap(model, NODES, backend=backend)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(tap)
    assert_outputs_equal(compiled(x), tiny_reference(model, x), rtol=1e-5, atol=1e-5)
    assert_outputs_equal(compiled(x), tap(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strict", [False, True])
def test_fx_tap_exports(strict):
    model = tiny_model().eval()
    tap = FeatureTap(model, NODES, backend="fx")
    assert tap.copied == ["conv"]  # the export keeps the copy before the in-place ReLU
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(tap, (x,), strict=strict)
    y = torch.randn(2, 3, 8, 8)
    assert_outputs_equal(exported.module()(y), tiny_reference(model, y))


@pytest.mark.skipif(
    not EXPORT_DETECTABLE,
    reason="before torch 2.14, torch.compiler.is_exporting is missing or also true under "
    "torch.compile, so a tap cannot tell an export from a compile",
)
@pytest.mark.parametrize("strict", [False, True])
def test_exporting_a_hooks_tap_fails_and_says_why(strict):
    tap = FeatureTap(tiny_model().eval(), NODES, backend="hooks")
    with pytest.raises(Exception, match="hooks backend.*backend='fx'") as error:
        torch.export.export(tap, (torch.randn(2, 3, 8, 8),), strict=strict)
    if not strict:  # strict export (dynamo) wraps what the forward raised in its own error
        assert isinstance(error.value, FeaturescopeError)


def test_torchscript_is_refused_with_what_to_use_instead():
    tap = FeatureTap(tiny_model(), NODES)
    with warnings.catch_warnings():
        # TorchScript's own deprecation notice, where this torch gives one.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("error", FeaturescopeWarning)
        with pytest.raises(FeaturescopeError, match="TorchScript.*torch.compile.*torch.export"):
            torch.jit.script(tap)
