"""The model zoo: the study's two AlexNets, torchvision's, the registry and its errors."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

import featurescope as fs
from _plugin_module import plugin_module


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _expected_alexnet_params(widths, hidden=2048, num_classes=5):
    w1, w2, w3, w4, w5 = widths
    convs = [(3, w1, 11), (w1, w2, 5), (w2, w3, 3), (w3, w4, 3), (w4, w5, 3)]
    linears = [(w5 * 36, hidden), (hidden, hidden), (hidden, num_classes)]
    return sum(i * o * k * k + o for i, o, k in convs) + sum(i * o + o for i, o in linears)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("alexnet", 26_830_213), ("alexnet_half", 14_591_685)],
)
def test_parameter_counts(name, expected):
    model = fs.create_model(name)
    assert _param_count(model) == expected
    widths = model.widths
    assert _param_count(model) == _expected_alexnet_params(widths)


def test_widths_are_the_study_s():
    assert fs.create_model("alexnet").widths == (96, 256, 384, 384, 256)
    assert fs.create_model("alexnet_half").widths == (48, 128, 192, 192, 128)


@pytest.mark.parametrize(
    ("name", "c1", "c2", "c3"), [("alexnet", 96, 256, 256), ("alexnet_half", 48, 128, 128)]
)
def test_stage_shapes(name, c1, c2, c3):
    model = fs.create_model(name).eval()
    x = torch.randn(2, 3, 227, 227)
    with torch.no_grad():
        y1 = model.conv1(x)
        y2 = model.conv2(y1)
        y3 = model.conv3(y2)
        out = model.fc(torch.flatten(y3, 1))
    assert y1.shape == (2, c1, 27, 27)
    assert y2.shape == (2, c2, 13, 13)
    assert y3.shape == (2, c3, 6, 6)
    assert out.shape == (2, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out)


def test_forward_matches_manual_functional_forward():
    model = fs.create_model("alexnet").eval()
    x = torch.randn(1, 3, 227, 227)
    F = torch.nn.functional
    p = dict(model.named_parameters())

    def conv(t, name, **kw):
        return F.conv2d(t, p[f"{name}.weight"], p[f"{name}.bias"], **kw)

    with torch.no_grad():
        t = F.max_pool2d(F.relu(conv(x, "conv1.0", stride=4)), 3, 2)
        t = F.max_pool2d(F.relu(conv(t, "conv2.0", padding=2)), 3, 2)
        t = F.relu(conv(t, "conv3.0", padding=1))
        t = F.relu(conv(t, "conv3.2", padding=1))
        t = F.max_pool2d(F.relu(conv(t, "conv3.4", padding=1)), 3, 2).flatten(1)
        t = F.relu(F.linear(t, p["fc.0.weight"], p["fc.0.bias"]))
        t = F.relu(F.linear(t, p["fc.3.weight"], p["fc.3.bias"]))
        expected = F.linear(t, p["fc.5.weight"], p["fc.5.bias"])
        torch.testing.assert_close(model(x), expected)


def test_classifier_layout():
    fc = fs.create_model("alexnet", num_classes=7).fc
    kinds = [type(m) for m in fc]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Linear]
    assert fc[0].in_features == 256 * 6 * 6 and fc[0].out_features == 2048
    assert fc[2].p == 0.5
    assert fc[5].out_features == 7


@pytest.mark.parametrize("size", [224, 256])
def test_wrong_input_size_names_227(size):
    model = fs.create_model("alexnet")
    with pytest.raises(fs.InputShapeError, match=r"227, 227") as info:
        model(torch.randn(1, 3, size, size))
    assert f"{size}, {size}" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_wrong_input_size_is_caught_through_torchvision_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor

    extractor = create_feature_extractor(fs.create_model("alexnet"), ["conv1"])
    with pytest.raises(fs.InputShapeError, match="227"):
        extractor(torch.randn(1, 3, 224, 224))


def test_tv_alexnet_is_torchvision_s_architecture():
    ours = fs.create_model("tv_alexnet", num_classes=1000)
    theirs = torchvision.models.alexnet(weights=None)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in theirs.state_dict().items()
    ]
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 3, 224, 224)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_tv_alexnet_weights_offline_names_file_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("FEATURESCOPE_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("featurescope tried to download while offline")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    with pytest.raises(fs.WeightsUnavailableError) as info:
        fs.create_model("tv_alexnet", weights="IMAGENET1K_V1")
    message = str(info.value)
    assert "alexnet-owt-7be5be79.pth" in message
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message


def test_tv_alexnet_weights_load_from_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.alexnet(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "alexnet-owt-7be5be79.pth")
    model = fs.create_model("tv_alexnet", weights=True, num_classes=1000)
    for (k, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    finetune = fs.create_model("tv_alexnet", weights=True, num_classes=5)
    assert finetune.classifier[6].out_features == 5
    assert torch.equal(finetune.features[0].weight, reference.features[0].weight)


def test_list_models_and_wildcards():
    names = fs.list_models()
    assert {"alexnet", "alexnet_half", "tv_alexnet"} <= set(names)
    assert names == sorted(names)
    assert fs.list_models("alexnet*") == ["alexnet", "alexnet_half"]
    assert fs.list_models("*half") == ["alexnet_half"]
    assert fs.list_models("nothing*") == []


def test_unknown_model_lists_closest_names():
    with pytest.raises(fs.UnknownNameError, match="alexnet") as info:
        fs.create_model("alexnett")
    assert "Did you mean" in str(info.value)
    assert isinstance(info.value, KeyError)


def test_model_info_carries_preprocessing():
    for name in ("alexnet", "alexnet_half"):
        info = fs.get_model_info(name)
        assert info.preprocessing == fs.STUDY_PREPROCESSING
        assert info.input_size == (3, 227, 227)
        assert info.stages == ("conv1", "conv2", "conv3", "fc")
        assert info.plugin == "featurescope.zoo.alexnet"
    assert fs.get_model_info("tv_alexnet").input_size == (3, 224, 224)


def test_preprocessing_transform_gives_model_input():
    from PIL import Image

    image = Image.new("RGB", (320, 240), color=(200, 10, 50))
    x = fs.get_model_info("alexnet").preprocessing.transform()(image)
    assert x.shape == (3, 227, 227)
    expected_red = (200 / 255 - 0.485) / 0.229
    torch.testing.assert_close(x[0], torch.full((227, 227), expected_red), atol=1e-3, rtol=0)
    restored = fs.STUDY_PREPROCESSING.denormalize(x)
    torch.testing.assert_close(
        restored[:, 0, 0], torch.tensor([200, 10, 50]) / 255, atol=1e-3, rtol=0
    )


def test_register_model_decorator_and_duplicates():
    from featurescope.zoo import decorated

    @fs.register_model("tiny_test_net")
    def tiny(num_classes=5, width=4):
        """A tiny test net."""
        return nn.Sequential(nn.Conv2d(3, width, 3), nn.Flatten(), nn.LazyLinear(num_classes))

    try:
        assert "tiny_test_net" in fs.list_models("tiny*")
        model = fs.create_model("tiny_test_net", num_classes=3, width=2)
        assert model[0].out_channels == 2
        assert fs.model_metadata(model) == fs.ModelMetadata("tiny_test_net", 3)
        assert fs.get_model_info("tiny_test_net").description == "A tiny test net."
        with pytest.raises(fs.FeaturescopeError, match="already registered"):
            fs.register_model("tiny_test_net")(tiny)
    finally:
        decorated.remove("tiny_test_net")
    assert "tiny_test_net" not in fs.list_models()


def test_builder_must_return_a_module():
    from featurescope.zoo import decorated

    fs.register_model("not_a_module")(lambda num_classes=5: "oops")
    try:
        with pytest.raises(fs.FeaturescopeError, match="not a torch.nn.Module"):
            fs.create_model("not_a_module")
    finally:
        decorated.remove("not_a_module")


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_num_classes(bad):
    with pytest.raises(fs.FeaturescopeError, match="num_classes"):
        fs.create_model("alexnet", num_classes=bad)


def test_torch_version_is_the_environment_s_pin():
    """Each tox environment pins a torch; make sure the tests really run on it."""
    expected = os.environ.get("FEATURESCOPE_EXPECT_TORCH")
    if not expected:
        pytest.skip("not running under tox (FEATURESCOPE_EXPECT_TORCH unset)")
    assert torch.__version__.split("+")[0] == expected
    expected_tv = os.environ["FEATURESCOPE_EXPECT_TORCHVISION"]
    assert torchvision.__version__.split("+")[0] == expected_tv


def test_bad_widths_and_weights_are_featurescope_errors():
    with pytest.raises(fs.FeaturescopeError, match="five conv widths"):
        fs.AlexNet(widths=(1, 2, 3))
    with pytest.raises(fs.FeaturescopeError, match="IMAGENET1K_V1"):
        fs.create_model("tv_alexnet", weights="bogus")


def test_register_model_records_stages_and_embedding_node():
    from featurescope.zoo import decorated

    @fs.register_model("probe_test_net", stages=("body",), embedding_node="body")
    def probe(num_classes=5):
        return nn.Sequential()

    try:
        info = fs.get_model_info("probe_test_net")
        assert info.stages == ("body",)
        assert info.embedding_node == "body"
    finally:
        decorated.remove("probe_test_net")


@pytest.fixture
def timm_hidden(monkeypatch):
    """A machine without timm: importlib finds no ``timm``, so its plugin registers nothing."""
    import importlib.util

    from featurescope.zoo import MODELS

    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "timm" or name.startswith("timm.") else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    MODELS.invalidate()
    yield
    monkeypatch.undo()
    MODELS.invalidate()


def test_timm_model_without_timm_says_install_timm(timm_hidden):
    assert fs.list_models("timm/*") == []
    with pytest.raises(fs.UnknownNameError) as info:
        fs.create_model("timm/resnet18")
    message = str(info.value)
    assert "install timm (pip install 'featurescope[timm]')" in message
    assert "unknown model" not in message


def test_unknown_timm_name_with_timm_installed_is_an_unknown_model():
    pytest.importorskip("timm")
    with pytest.raises(fs.UnknownNameError, match="unknown model 'timm/resnet18x'") as info:
        fs.get_model_info("timm/resnet18x")
    assert "install timm" not in str(info.value)


def test_pretrained_class_names_label_the_pretrained_head(fresh_plugins):
    """A spec's ``pretrained_class_names`` name the classes of a model built with its weights
    and their head; another head, or random weights, get no names."""

    fixed = torch.arange(12.0).reshape(3, 4)

    def builder(num_classes=5, weights=None):
        head = nn.Linear(4, num_classes)
        if weights:  # "pretrained": fixed weights for its 3 classes
            with torch.no_grad():
                head.weight[: len(fixed)] = fixed[:num_classes]
        return head

    spec = fs.ModelSpec(
        builder, weights="TOY", pretrained_classes=3, pretrained_class_names=("a", "b", "c")
    )
    plugin = plugin_module(featurescope_register_models=lambda: {"toy_pretrained": spec})
    fs.register_plugin(plugin, "toy-pretrained")
    pretrained = fs.create_model("toy_pretrained", pretrained=True)
    assert torch.equal(pretrained.weight, fixed)
    meta = fs.model_metadata(pretrained)
    assert (meta.num_classes, meta.class_names) == (3, ("a", "b", "c"))
    assert meta.weights == "toy-pretrained:TOY"
    other_head = fs.create_model("toy_pretrained", pretrained=True, num_classes=2)
    assert fs.model_metadata(other_head).class_names is None
    assert fs.model_metadata(fs.create_model("toy_pretrained")).class_names is None
    renamed = fs.create_model("toy_pretrained", pretrained=True, class_names=["x", "y", "z"])
    assert fs.model_metadata(renamed).class_names == ("x", "y", "z")


def test_cli_timm_model_without_timm_says_install_timm(timm_hidden, tmp_path, capsys):
    from PIL import Image

    from featurescope.cli import main

    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    argv = ["maps", str(tmp_path / "photo.png"), "--model", "timm/resnet18"]
    assert main([*argv, "--out", str(tmp_path / "maps")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurescope maps: error: model 'timm/resnet18' is one of timm's")
    assert "install timm (pip install 'featurescope[timm]')" in err and len(err.splitlines()) == 1
