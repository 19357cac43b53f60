"""FeatureTap against a manual forward, torchvision's extractor, and random small conv nets."""

from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.models.feature_extraction import (
    get_graph_node_names as tv_get_graph_node_names,
)

import featurescope as fs
from featurescope.cli import main
from featurescope.errors import (
    FeaturescopeError,
    FeaturescopeWarning,
    InputShapeError,
    NodeNotFoundError,
)
from featurescope.tap import FeatureTap, get_graph_node_names
from featurescope.tap._fx import resolve_node

ZOO = ("alexnet", "alexnet_half", "tv_alexnet")
STUDY_NODES = {"conv1": "output1", "conv2": "output2", "conv3": "output3", "fc": "output4"}


def _run_layers(prefix: str, layers: nn.Sequential, h: torch.Tensor, out: dict) -> torch.Tensor:
    for i, layer in enumerate(layers):
        # Each layer gets its own copy, so an in-place layer cannot change what was recorded.
        h = layer(h.clone())
        out[f"{prefix}.{i}"] = h
    return h


def manual_nodes(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every graph node's output, computed layer by layer without torch.fx or hooks."""
    out: dict[str, torch.Tensor] = {"x": x.clone()}
    if isinstance(model, fs.zoo.AlexNet):
        out["check_input_size"] = x.clone()
        h = x
        for stage in ("conv1", "conv2", "conv3"):
            h = _run_layers(stage, getattr(model, stage), h, out)
        h = torch.flatten(h, 1)
        out["flatten"] = h
        _run_layers("fc", model.fc, h, out)
    else:  # torchvision's AlexNet
        h = _run_layers("features", model.features, x, out)
        h = model.avgpool(h)
        out["avgpool"] = h
        h = torch.flatten(h, 1)
        out["flatten"] = h
        _run_layers("classifier", model.classifier, h, out)
    return out


def reference_for(name: str, ref: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a request means: the node itself, or the last node under a module prefix."""
    if name in ref:
        return ref[name]
    return ref[[k for k in ref if k.startswith(name + ".")][-1]]


@functools.cache
def zoo(name: str) -> SimpleNamespace:
    """One zoo model with every node computed by hand, by both backends and by torchvision.

    Computed once per model for the whole file: CPU forwards of AlexNet are what makes it slow.
    """
    torch.manual_seed(0)
    model = fs.create_model(name).eval()
    x = torch.randn(2, *fs.zoo.model_spec(name).input_size)
    names = get_graph_node_names(model)[1]
    modules = [m for m, _ in model.named_modules() if m]
    fx_tap = FeatureTap(model, names, backend="fx")
    with torch.no_grad():
        return SimpleNamespace(
            name=name,
            model=model,
            x=x,
            names=names,
            modules=modules,
            ref=manual_nodes(model, x),
            fx_tap=fx_tap,
            fx=fx_tap(x),
            hooks=FeatureTap(model, modules, backend="hooks")(x),
            tv=create_feature_extractor(model, names)(x),
        )


@pytest.fixture(params=ZOO)
def case(request) -> SimpleNamespace:
    return zoo(request.param)


def test_manual_forward_lists_every_graph_node(case):
    assert list(case.ref) == case.names


def test_every_node_matches_manual_forward(case):
    assert list(case.fx) == case.names
    for node, value in case.ref.items():
        assert torch.equal(case.fx[node], value), node


def test_every_module_through_hooks_matches_manual_forward(case):
    assert list(case.hooks) == case.modules
    for name in case.modules:
        assert torch.equal(case.hooks[name], reference_for(name, case.ref)), name


def test_only_nodes_overwritten_in_place_are_copied(case):
    relus = [n for n, m in case.model.named_modules() if isinstance(m, nn.ReLU) and m.inplace]
    assert relus  # every ReLU of these nets is in place
    # The node just before an in-place ReLU is the one it overwrites.
    expected = {case.names[case.names.index(r) - 1] for r in relus}
    assert set(case.fx_tap.copied) == expected
    stages = fs.model_metadata(case.model).stage_nodes
    assert FeatureTap(case.model, list(stages)).copied == []


def test_matches_torchvision_wherever_torchvision_is_right(case):
    # torchvision returns the nodes we copy as the following in-place ReLU left them.
    for node in case.names:
        if node not in case.fx_tap.copied:
            assert torch.equal(case.fx[node], case.tv[node]), node
        else:
            assert torch.equal(torch.relu(case.fx[node]), case.tv[node]), node


def test_get_graph_node_names_matches_torchvision(case):
    assert get_graph_node_names(case.model) == tv_get_graph_node_names(case.model)


def test_single_nodes_are_pruned_and_right():
    c = zoo("alexnet_half")
    with torch.no_grad():
        for node in ["x", "conv1.0", "conv1.1", "conv2.0", "conv3", "flatten", "fc.2"]:
            tap = FeatureTap(c.model, [node], backend="fx")
            assert torch.equal(tap(c.x)[node], reference_for(node, c.ref)), node
        for name in ["conv1.0", "conv2", "fc.4"]:
            tap = FeatureTap(c.model, [name], backend="hooks")
            assert torch.equal(tap(c.x)[name], reference_for(name, c.ref)), name


def test_study_snippet_works_unchanged():
    c = zoo("alexnet")
    with torch.no_grad():
        out = FeatureTap(c.model, return_nodes=STUDY_NODES)(c.x)
    assert list(out) == ["output1", "output2", "output3", "output4"]
    for node, alias in STUDY_NODES.items():
        assert torch.equal(out[alias], reference_for(node, c.ref))
        assert torch.equal(out[alias], c.tv[resolve_node(node, c.names)])


def test_conv1_conv_output_is_pre_relu_even_with_deeper_nodes():
    c = zoo("alexnet")
    with torch.no_grad():
        for backend in ("fx", "hooks"):
            out = FeatureTap(c.model, ["conv1.0", "conv2"], backend=backend)(c.x)
            assert torch.equal(out["conv1.0"], c.ref["conv1.0"]), backend
            assert torch.equal(out["conv2"], c.ref["conv2.2"]), backend
            assert (out["conv1.0"] < 0).any()


class FunctionalInplace(nn.Module):
    """In-place writes that no module announces: methods, operators, views, inplace=True."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        if self.op == "relu_":
            a.relu_()
        elif self.op == "iadd":
            a += 1.0
        elif self.op == "functional":
            a = F.relu(a, inplace=True)
        elif self.op == "setitem":
            a[:, 0] = 0.0
        elif self.op == "view":
            a.flatten(1).mul_(2.0)
        elif self.op == "out":
            torch.mul(a, 3.0, out=a)
        return self.head(a)


@pytest.mark.parametrize("op", ["relu_", "iadd", "functional", "setitem", "view", "out"])
@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_functional_inplace_writes_do_not_change_tapped_values(op, backend):
    model = FunctionalInplace(op).eval()
    x = torch.randn(2, 3, 6, 6)
    if op == "setitem" and backend == "fx":
        with pytest.raises(FeaturescopeError, match="item assignment"):
            FeatureTap(model, ["conv", "head"], backend=backend)  # torch.fx cannot trace x[i] = y
        return
    tap = FeatureTap(model, ["conv", "head"], backend=backend)
    with torch.no_grad():
        out = tap(x)
        assert torch.equal(out["conv"], model.conv(x))
        assert torch.equal(out["head"], model(x))
    if backend == "fx":
        # torch.fx records ``a += 1`` as ``a + 1``: nothing is written in place, nothing copied.
        assert tap.copied == ([] if op == "iadd" else ["conv"])


def test_inference_mode_and_autograd_both_work():
    model = FunctionalInplace("relu_")
    x = torch.randn(2, 3, 6, 6)
    for backend in ("fx", "hooks"):
        tap = FeatureTap(model, ["conv", "head"], backend=backend)
        with torch.inference_mode():
            assert torch.equal(tap(x)["conv"], model.conv(x))
        out = tap(x)
        out["head"].sum().backward()
        assert model.conv.weight.grad is not None
        model.zero_grad()


class Branchy(nn.Module):
    """Branches on a tensor's value, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.relu(x) if x.sum() > 0 else -x
        return self.fc(self.pool(x).flatten(1))


def test_untraceable_model_falls_back_to_hooks_with_one_warning():
    model = Branchy().eval()
    with pytest.warns(FeaturescopeWarning, match="control flow") as record:
        tap = FeatureTap(model, ["conv", "fc"])
    assert len([w for w in record if issubclass(w.category, FeaturescopeWarning)]) == 1
    assert tap.backend == "hooks"
    assert "control flow" in (tap.fallback_reason or "")
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calling the tap warns no more
        with torch.no_grad():
            out = tap(x)
            assert torch.equal(out["conv"], model.conv(x))  # before the in-place ReLU
            assert torch.equal(out["fc"], model(x))


def test_fx_backend_on_untraceable_model_is_an_error():
    with pytest.raises(FeaturescopeError, match="cannot trace Branchy.*hooks"):
        FeatureTap(Branchy(), ["conv"], backend="fx")
    with pytest.raises(FeaturescopeError, match="cannot trace"):
        get_graph_node_names(Branchy())


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_hooks_backend_refuses_a_functional_node_clearly():
    assert "add" in get_graph_node_names(Residual())[1]
    with pytest.raises(NodeNotFoundError, match="'add'.*operation, not a module.*backend='fx'"):
        FeatureTap(Residual(), ["add"], backend="hooks")
    model, x = Residual(), torch.randn(1, 2, 4, 4)
    with torch.no_grad():
        assert torch.equal(FeatureTap(model, ["add"])(x)["add"], model(x))


class Counter:
    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, *_):
        self.calls += 1


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_tapping_conv1_does_not_run_the_rest(backend):
    model = zoo("alexnet_half").model
    tap = FeatureTap(model, ["conv1"], backend=backend)
    later = [Counter(model.conv2), Counter(model.fc[5])]  # after tracing, which calls them
    first = Counter(model.conv1[0])
    with torch.no_grad():
        tap(torch.randn(1, 3, 227, 227))
    for counter in (first, *later):
        counter.handle.remove()
    assert first.calls == 1
    assert [c.calls for c in later] == [0, 0]


class SmallClassifier(nn.Module):
    """The study's pattern in miniature: in-place ReLUs, and dropout between linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(2)
        )
        self.fc = nn.Sequential(
            nn.Linear(16, 32), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(32, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_follows_train_and_eval_mode(backend):
    model = SmallClassifier()
    x = torch.randn(4, 3, 8, 8)
    tap = FeatureTap(model, {"fc.1": "relu", "fc.2": "dropped", "fc": "logits"}, backend=backend)
    with torch.no_grad():
        model.train()
        torch.manual_seed(1)
        out = tap(x)
        torch.manual_seed(1)
        assert torch.equal(out["logits"], model(x))
        # Dropout is active: some activations are zeroed, the others scaled by 1 / (1 - p).
        kept = out["dropped"] != 0
        assert not kept[out["relu"] > 0].all()
        assert torch.allclose(out["dropped"][kept], 2 * out["relu"][kept])
        model.eval()
        out = tap(x)
        assert torch.equal(out["dropped"], out["relu"])
        assert torch.equal(out["logits"], model(x))


def test_building_a_tap_keeps_each_submodules_mode():
    model = fs.create_model("alexnet_half").train()
    model.fc[2].eval()  # a deliberately frozen dropout
    FeatureTap(model, ["fc"])
    get_graph_node_names(model)
    assert model.training and model.conv1.training
    assert not model.fc[2].training


def test_unknown_node_names_the_closest_and_the_lister():
    model = fs.create_model("alexnet")
    with pytest.raises(
        NodeNotFoundError, match=r"'conv4'.*Did you mean.*'conv1'.*get_graph_node_names"
    ):
        FeatureTap(model, ["conv4"])
    with pytest.raises(NodeNotFoundError, match=r"not a module.*Did you mean.*'conv1'"):
        FeatureTap(model, ["conv4"], backend="hooks")
    assert isinstance(NodeNotFoundError("x"), KeyError)


def test_bad_return_nodes_are_clear_errors():
    model = fs.create_model("alexnet")
    with pytest.raises(FeaturescopeError, match="empty"):
        FeatureTap(model, [])
    with pytest.raises(FeaturescopeError, match="'conv1.2' twice"):
        FeatureTap(model, {"conv1": "a", "conv1.2": "b"})
    with pytest.raises(FeaturescopeError, match="'conv1' twice"):
        FeatureTap(model, ["conv1", "conv1"])
    with pytest.raises(FeaturescopeError, match="alias 'a'"):
        FeatureTap(model, {"conv1": "a", "conv2": "a"})
    with pytest.raises(FeaturescopeError, match="backend"):
        FeatureTap(model, ["conv1"], backend="jit")  # type: ignore[arg-type]


def test_wrong_input_size_and_device_are_clear_errors():
    model = fs.create_model("alexnet").eval()
    with pytest.raises(InputShapeError, match="227"):
        FeatureTap(model, ["conv1"])(torch.zeros(1, 3, 224, 224))
    tv = fs.create_model("tv_alexnet").eval()
    for backend in ("fx", "hooks"):
        with pytest.raises(InputShapeError, match=r"\[1, 1, 224, 224\]"):
            FeatureTap(tv, ["features.0"], backend=backend)(torch.zeros(1, 1, 224, 224))
    meta = fs.create_model("alexnet_half").to("meta")
    with pytest.raises(FeaturescopeError, match="model is on meta but the input is on cpu"):
        FeatureTap(meta, ["conv1"])(torch.zeros(1, 3, 227, 227))


@pytest.mark.parametrize("backend", ["fx", "hooks"])
def test_wrong_input_dtype_is_a_dtype_error_not_a_shape_error(backend):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    tap = FeatureTap(model, ["0", "2"], backend=backend)
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(FeaturescopeError) as error:
        tap(x)
    assert not isinstance(error.value, InputShapeError)
    message = str(error.value)
    assert "torch.float64" in message and "torch.float32" in message
    assert "x.to(torch.float32)" in message and "model.to(torch.float64)" in message
    out = tap(x.to(torch.float32))
    torch.testing.assert_close(out["2"], model(x.to(torch.float32)))
    # Autocast casts per layer: an input of another dtype is intended there.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tap(x.to(torch.bfloat16))["2"].shape == (5, 2)

    # Parameters of several dtypes: no up-front check, and PyTorch's own dtype message
    # ("mat1 and mat2 must have the same dtype") is still not taken for a shape problem.
    mixed = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2).double()).eval()
    with pytest.raises(RuntimeError, match="dtype") as error:
        FeatureTap(mixed, ["1"], backend=backend)(x.float())
    assert not isinstance(error.value, InputShapeError)


def test_summary_prints_and_returns_shapes_and_params(capsys):
    c = zoo("alexnet_half")
    model = c.model.train()
    try:
        for backend in ("fx", "hooks"):
            rows = FeatureTap(model, STUDY_NODES, backend=backend).summary()
            assert [r.alias for r in rows] == list(STUDY_NODES.values())
            for row, stage in zip(rows, STUDY_NODES, strict=True):
                assert row.output_shape == (-1, *reference_for(stage, c.ref).shape[1:])
                assert row.params == sum(p.numel() for p in getattr(model, stage).parameters())
            printed = capsys.readouterr().out
            # fx names the stage's last op; hooks tap the stage module itself.
            assert ("MaxPool2d" if backend == "fx" else "Sequential") in printed
            assert "[-1, 128, 6, 6]" in printed
            assert f"{sum(p.numel() for p in model.parameters()):,}" in printed
        assert model.training  # summary ran in eval mode and restored the model's mode
    finally:
        model.eval()


def test_summary_needs_a_size_for_models_outside_the_zoo():
    tap = FeatureTap(Residual(), ["conv"])
    with pytest.raises(FeaturescopeError, match="input_size"):
        tap.summary()
    assert tap.summary((2, 5, 5), print_fn=None)[0].output_shape == (-1, 2, 5, 5)


def test_cli_summary_and_nodes(capsys):
    assert main(["summary", "alexnet_half", "--nodes", "conv1,fc"]) == 0
    printed = capsys.readouterr().out
    assert "conv1.2" in printed and "[-1, 48, 27, 27]" in printed and "fc.5" in printed
    assert main(["nodes", "alexnet"]) == 0
    model = fs.create_model("alexnet")
    assert capsys.readouterr().out.split() == get_graph_node_names(model)[1]
    assert main(["summary", "alexnet", "--nodes", "conv9"]) == 1
    assert "Did you mean" in capsys.readouterr().err
    assert main(["summary", "tv_alexnet"]) == 0
    assert "classifier.6" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["fx", "hooks", "auto"])
def test_cli_summary_lists_every_layer_the_backend_can_tap(capsys, backend):
    assert main(["summary", "alexnet_half", "--backend", backend]) == 0
    printed = capsys.readouterr().out
    model = fs.create_model("alexnet_half")
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    graph = get_graph_node_names(model)[1]
    expected = leaves if backend == "hooks" else [n for n in graph if n != "x"]
    rows = [line.split()[0] for line in printed.splitlines() if line.split()[:1] != []]
    listed = [name for name in rows if name in set(graph) | set(leaves) | {"x"}]
    assert listed == expected
    assert "[-1, 128, 6, 6]" in printed and "[-1, 5]" in printed


# ---------------------------------------------------------------- random small conv nets


class AddInplace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.add_(1.0)


class ScaleViewInplace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        flat.mul_(0.5)  # writes into x through a view
        # The module's last op is its output: fx names a traced-through module by its last op.
        return flat.view_as(x)


class RandomNet(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@st.composite
def random_nets(draw):
    channels, size, layers = 3, 8, []
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(
            st.sampled_from(["conv", "relu", "relu_", "pool", "bn", "add_", "view_mul_", "drop"])
        )
        if kind == "conv":
            out = draw(st.integers(1, 4))
            layers.append(nn.Conv2d(channels, out, draw(st.sampled_from([1, 3])), padding="same"))
            channels = out
        elif kind in ("relu", "relu_"):
            layers.append(nn.ReLU(inplace=kind == "relu_"))
        elif kind == "pool" and size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        elif kind == "bn":
            bn = nn.BatchNorm2d(channels)
            bn.running_mean.uniform_(-1, 1)
            layers.append(bn)
        elif kind == "add_":
            layers.append(AddInplace())
        elif kind == "view_mul_":
            layers.append(ScaleViewInplace())
        else:
            layers.append(nn.Dropout(0.5, inplace=draw(st.booleans())))
    net = RandomNet(layers).eval()
    picked = draw(st.lists(st.integers(0, len(layers) - 1), min_size=1, unique=True))
    return net, [f"layers.{i}" for i in picked]


@given(case=random_nets(), backend=st.sampled_from(["fx", "hooks"]), seed=st.integers(0, 2**16))
def test_random_conv_nets_match_manual_forward(case, backend, seed):
    net, nodes = case
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 8, 8)
    ref: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        h = x
        for i, layer in enumerate(net.layers):
            h = layer(h.clone())
            ref[f"layers.{i}"] = h
        out = FeatureTap(net, {n: f"out{j}" for j, n in enumerate(nodes)}, backend=backend)(x)
    assert list(out) == [f"out{j}" for j in range(len(nodes))]
    for j, node in enumerate(nodes):
        assert torch.equal(out[f"out{j}"], ref[node]), (node, net)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_summary_runs_models_of_any_floating_dtype(dtype):
    model = fs.create_model("alexnet_half").to(dtype)
    rows = FeatureTap(model, ["conv1", "fc.4"]).summary(print_fn=None)
    assert [r.output_shape for r in rows] == [(-1, 48, 27, 27), (-1, 2048)]


def test_wrong_channels_are_refused_before_the_model_runs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten()).eval()
    runs = []
    model[0].register_forward_pre_hook(lambda m, args: runs.append(1))
    tap = FeatureTap(model, ["1"], backend="fx")
    with pytest.raises(InputShapeError, match=r"\[2, 1, 8, 8\].*takes 3 channels"):
        tap(torch.zeros(2, 1, 8, 8))
    assert runs == []
    assert tap(torch.zeros(2, 3, 8, 8))["1"].shape == (2, 4, 6, 6)
    mlp = FeatureTap(nn.Sequential(nn.Linear(5, 2)), ["0"], backend="fx")
    with pytest.raises(InputShapeError, match="takes 5 features"):
        mlp(torch.zeros(3, 4))


def test_errors_the_model_raises_itself_pass_unchanged():
    """Without a known first layer, the model's own exception reaches the caller as it was."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    with pytest.raises(RuntimeError) as error:
        FeatureTap(model, ["0"], backend="hooks")(torch.zeros(1, 2, 8, 8))
    assert type(error.value) is RuntimeError and "channels" in str(error.value)
