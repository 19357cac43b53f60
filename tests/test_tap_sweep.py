"""FeatureTap proven node by node on every torchvision classification model.

For each model of ``torchvision.models.list_models(module=torchvision.models)`` (random weights,
eval mode, about the smallest input it accepts, one thread), every node of the eval graph is
tapped at once with the fx backend and every module that runs with the hooks backend, and each
value is compared bit for bit with an independent reference (``tests/_tap_reference.py``): the
eager module call cloned when it returned, and the graph re-executed with a clone after every
node. torchvision's ``create_feature_extractor`` is run on the same nodes and its errors are
counted (``docs/tap_models.rst`` tabulates them); ``FEATURESCOPE_SWEEP_REPORT=dir`` writes one
JSON row per model there.

A subset runs in the fast lane on every torch; the other models are ``slow`` and run on the
newest torch only, since node names and graphs differ slightly between versions. The largest
models (``regnet_y_128gf``, ``vit_h_14``, ...) are left out unless ``FEATURESCOPE_FULL_SWEEPS=1``:
``tests/_sweep.py`` lists them and says why.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import feature_extraction as tv_fx

import _sweep as sweep
import _tap_reference as ref
from featurescope import FeatureTap
from featurescope.errors import FeaturescopeWarning
from featurescope.tap import tappable_nodes
from featurescope.tap._trace import _tracer_kwargs, trace

#: The fast lane's models, run on every torch; the rest are slow (``tests/_sweep.py``).
SUBSET = ("resnet18", "vit_b_16", "densenet121", "mobilenet_v3_small", "swin_t")

#: About the smallest input side each family accepts (ViTs get ``image_size=`` to match).
_INPUT = {
    "alexnet": 63,
    "googlenet": 32,
    "inception_v3": 75,
    "maxvit_t": 224,  # its 7x7 partitions need every stage's side divisible by 7
    "squeezenet1_0": 32,
    "squeezenet1_1": 32,
}


def _input_side(name: str) -> int:
    if name in _INPUT:
        return _INPUT[name]
    if name.startswith("vit_"):
        return int(name.rsplit("_", 1)[1])  # one patch
    return 32


#: The slowest to build and run, started first so that parallel workers finish together.
_SLOWEST = ("regnet_y_128gf", "maxvit_t", "vit_h_14", "convnext_large", "vit_l_16", "vit_l_32")


def _models() -> list[pytest.param]:
    names = sweep.torchvision_classifiers()
    names = [n for n in _SLOWEST if n in names] + [n for n in names if n not in _SLOWEST]
    return sweep.params(names, SUBSET)


def _build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    side = _input_side(name)
    kwargs = {"image_size": side} if name.startswith("vit_") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception init notices
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    return model.eval(), torch.randn(2, 3, side, side)


def _torchvision_names(model: torch.nn.Module) -> list[str]:
    tracer = tv_fx.NodePathTracer(**_tracer_kwargs(None))
    tracer.trace(model)
    return list(tracer.node_to_qualname.values())


def _wrong(got: dict[str, object], expected: dict[str, object], **tolerance: float) -> list[str]:
    return [n for n, value in expected.items() if not ref.same(got[n], value, **tolerance)]


@pytest.mark.timeout(900)  # the largest models take minutes on a busy 2-core machine
@pytest.mark.parametrize("name", _models())
def test_every_node_of_a_torchvision_model(name: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _sweep(name)
    finally:
        torch.set_num_threads(threads)


def _sweep(name: str) -> None:
    model, x = _build(name)
    with torch.no_grad():
        calls = ref.module_calls(model, x)
        traced = trace(model, training=False)
        nodes = {q: n for n, q in traced.qualnames.items()}
        snapshots = ref.node_snapshots(traced.module, traced.qualnames, x)

        # Every leaf module's node is named by its path: the eager call of that very module.
        for qual, node in nodes.items():
            if node.op == "call_module":
                assert qual in calls, f"{name}: node {qual!r} names no module call"
                assert ref.same(snapshots[qual], calls[qual]), f"{name}: {qual} != eager"

        # fx backend: every eval node also present in training mode, tapped at once.
        # tappable_nodes lists exactly these (the model's inputs left out).
        train_names = set(trace(model, training=True).names)
        tapped = tappable_nodes(model)
        assert tapped == [
            q for q in traced.names if q in train_names and nodes[q].op != "placeholder"
        ]
        tap = FeatureTap(model, tapped, backend="fx")
        got = tap(x)
        expected = {q: ref.expected_value(q, nodes[q], calls, snapshots) for q in tapped}
        wrong = _wrong(got, expected)
        assert not wrong, f"{name}: fx backend wrong on {len(wrong)} nodes: {wrong[:8]}"

        # hooks backend: every module that ran, its first call.
        modules = [n for n, _ in model.named_modules() if n and n in calls]
        hooks = FeatureTap(model, modules, backend="hooks")(x)
        # Rounding only: the in-place guard (a TorchFunctionMode) takes MultiheadAttention off
        # its fused fast path; an overwritten output differs by far more.
        wrong = _wrong(hooks, {m: calls[m] for m in modules}, rtol=1e-4, atol=1e-5)
        assert not wrong, f"{name}: hooks backend wrong on {len(wrong)} modules: {wrong[:8]}"

        # The tap takes its own list in training mode too, and changes nothing.
        _own_list(model, x, training=True)
        model.eval()

        # torchvision's extractor on its own names for the same nodes.
        tv_names = _torchvision_names(model)
        assert len(tv_names) == len(traced.names)
        extractor = tv_fx.create_feature_extractor(
            model,
            train_return_nodes=tv_names[-1:],
            eval_return_nodes=tv_names,
            suppress_diff_warning=True,
        ).eval()
        tv = ref.compare_torchvision(tv_names, traced.names, extractor(x), nodes, calls, snapshots)

    report = os.environ.get("FEATURESCOPE_SWEEP_REPORT")
    if report:
        row = {
            "model": name,
            "input": x.shape[-1],
            "nodes": len(traced.names),
            "tapped": len(tapped),
            "modules": len(modules),
            "copied": len(tap.copied),
            **{f"tv_{k}": len(v) for k, v in tv.items()},
            "tv_examples": {k: v[:3] for k, v in tv.items() if k != "right"},
        }
        Path(report).mkdir(parents=True, exist_ok=True)
        (Path(report) / f"{name}.json").write_text(json.dumps(row, indent=1))


def _state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[object]]:
    # Buffers only: cloning a large model's parameters would cost more than the check.
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    return buffers, [(n, sorted(vars(m)), m.training) for n, m in model.named_modules()]


def _own_list(model: torch.nn.Module, x: torch.Tensor, training: bool) -> None:
    """``FeatureTap(m, tappable_nodes(m))`` builds and runs in one mode, leaving ``m`` as it was.

    Values are compared elsewhere in eval mode; in training mode dropout draws at random.
    """
    model.train(training)
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FeaturescopeWarning)  # a fallback to hooks
        nodes = tappable_nodes(model, example_inputs=(x,))
        tap = FeatureTap(model, nodes)
    after = _state(model)
    assert after[1] == before[1], "listing nodes or building a tap changed an attribute or mode"
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items()), "... or a buffer"
    assert set(tap(x)) == set(nodes)


#: timm families with the patterns issue 21 found: LeViT and EfficientFormer branch on
#: ``self.training``, a ViT with ``dynamic_img_size`` falls back to hooks and never runs its
#: ``attn_drop`` (attention is fused), ``BatchNormAct2d`` bumps its counter when traced.
_TIMM = {
    "levit_128s": ({}, 224),
    "efficientformer_l1": ({}, 224),
    "vit_tiny_patch16_224": ({"dynamic_img_size": True, "img_size": 32}, 32),
    "efficientnet_b0": ({}, 32),
    "convnext_atto": ({}, 32),
}


#: The timm cases of the fast lane; the others run in the full lane (``tests/_sweep.py``).
_TIMM_SUBSET = ("vit_tiny_patch16_224", "convnext_atto")


@pytest.mark.parametrize("name", sweep.params(list(_TIMM), _TIMM_SUBSET))
def test_a_timm_model_takes_its_own_node_list(name: str, one_thread: None) -> None:
    timm = pytest.importorskip("timm")
    kwargs, side = _TIMM[name]
    model = timm.create_model(name, pretrained=False, **kwargs)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        _own_list(model, x, training=True)
        model.eval()
        nodes = tappable_nodes(model, example_inputs=(x,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FeaturescopeWarning)
            tap = FeatureTap(model, nodes)
        got = tap(x)
        calls = ref.module_calls(model, x)
        if tap.backend == "fx":
            traced = trace(model, training=False)
            snapshots = ref.node_snapshots(traced.module, traced.qualnames, x)
            by_name = {q: n for n, q in traced.qualnames.items()}
            expected = {q: ref.expected_value(q, by_name[q], calls, snapshots) for q in nodes}
        else:
            expected = {m: calls[m] for m in nodes}
    # Rounding only, as above: the in-place guard takes fused attention off its fast path.
    wrong = _wrong(got, expected, rtol=1e-4, atol=1e-5)
    assert not wrong, f"{name}: {tap.backend} backend wrong on {len(wrong)} nodes: {wrong[:8]}"


def test_torchvision_misnames_vit_layer_norms_and_featuretap_does_not() -> None:
    """The root cause, shown on one layer: torchvision strips ``_1`` from the module path ``ln_1``."""
    model, x = _build("vit_b_16")
    layer = "encoder.layers.encoder_layer_0"
    with torch.no_grad():
        calls = ref.module_calls(model, x)
        ours = FeatureTap(model, [f"{layer}.ln_1", f"{layer}.ln_2"], backend="fx")(x)
        extractor = tv_fx.create_feature_extractor(model, [f"{layer}.ln_1"]).eval()
        theirs = extractor(x)
    assert ref.same(ours[f"{layer}.ln_1"], calls[f"{layer}.ln_1"])
    assert ref.same(ours[f"{layer}.ln_2"], calls[f"{layer}.ln_2"])
    assert ref.same(theirs[f"{layer}.ln_1"], calls[f"{layer}.ln_2"])
    assert not ref.same(theirs[f"{layer}.ln_1"], calls[f"{layer}.ln_1"])


class _Writes(torch.nn.Module):
    """A conv whose output an in-place activation overwrites, read in several ways after it."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.act = torch.nn.ReLU(inplace=True)
        self.leaky = torch.nn.LeakyReLU(0.3, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv(x)
        if self.how == "module":
            b = self.act(a)
        elif self.how == "leaky":
            b = self.leaky(a)
        elif self.how == "functional":
            b = torch.nn.functional.hardswish(a, inplace=True)
        elif self.how == "method":
            b = a.relu_()
        elif self.how == "read_after":  # reads the written storage through ``a`` itself
            b = self.act(a) + a
        elif self.how == "view_before":  # a view taken before the write sees it
            v = a.flatten(1)
            b = self.act(a)
            return b.sum() + v.sum()
        return b * 2


@pytest.mark.parametrize(
    "how", ["module", "leaky", "functional", "method", "read_after", "view_before"]
)
def test_in_place_writes_made_out_of_place_only_where_nothing_else_sees_them(how: str) -> None:
    torch.manual_seed(0)
    model = _Writes(how).eval()
    x = torch.randn(2, 3, 8, 8)
    traced = trace(model, training=False)
    with torch.no_grad():
        calls = ref.module_calls(model, x)
        snapshots = ref.node_snapshots(traced.module, traced.qualnames, x)
        tap = FeatureTap(model, traced.names, backend="fx")
        got = tap(x)
        model_out = model(x)
    for name in traced.names:
        assert ref.same(got[name], snapshots[name]), name
    assert ref.same(got["conv"], calls["conv"])
    assert ref.same(got[traced.names[-1]], model_out)
    assert "conv" in tap.copied  # kept intact either way: copied or the write made out of place
    # The model itself is untouched: its activation modules still work in place.
    assert model.act.inplace and model.leaky.inplace
