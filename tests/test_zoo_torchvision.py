"""The torchvision (and timm) zoo: every model by name, its facts read off torchvision, weights
only from local caches, and embedding nodes that are what the classifier really reads."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import _sweep as sweep
import featurescope as fs
from featurescope.zoo.torchvision_models import torchvision_names

TV_NAMES = [n for n in torchvision_names() if n != "alexnet"]


# One torch thread per test (conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_torchvision_classification_model_is_in_the_zoo():
    listed = set(fs.list_models())
    assert set(TV_NAMES) <= listed
    assert len(TV_NAMES) >= 79
    # torchvision's own alexnet keeps its featurescope name; "alexnet" is the study's.
    assert fs.zoo.model_spec("alexnet").plugin == "featurescope.zoo.alexnet"
    assert fs.zoo.model_spec("tv_alexnet").plugin == "featurescope.zoo.torchvision_models"


@pytest.mark.parametrize("name", TV_NAMES)
def test_preprocessing_is_read_from_the_default_weights(name):
    transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    pre = fs.zoo.model_spec(name).preprocessing
    assert pre.crop == transforms.crop_size[0]
    assert pre.resize == transforms.resize_size[0]
    assert pre.mean == tuple(transforms.mean) and pre.std == tuple(transforms.std)
    assert pre.interpolation == transforms.interpolation.value


def test_unknown_name_suggests_close_ones():
    with pytest.raises(fs.errors.UnknownNameError, match="resnet18"):
        fs.create_model("resnet-18")


def _classifier_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    seen: list[torch.Tensor] = []
    handle = linears[-1].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[-1]


# One of each family, at inputs small enough to run in seconds.
FAMILIES = {
    "resnet18": 64,
    "vgg11": 64,
    "densenet121": 64,
    "mobilenet_v3_small": 64,
    "efficientnet_b0": 64,
    "regnet_x_400mf": 64,
    "convnext_tiny": 64,
    "shufflenet_v2_x0_5": 64,
    "mnasnet0_5": 64,
    "googlenet": 64,
    "inception_v3": 75,
    "swin_t": 64,
    "vit_b_16": 224,
    "tv_alexnet": 64,
}


#: The families the fast lane checks on every torch; the others run in the full lane.
_FAST = ("resnet18", "densenet121", "vit_b_16", "tv_alexnet", "mobilenet_v3_small")


@pytest.mark.parametrize("name", sweep.params(sorted(FAMILIES), _FAST))
def test_embedding_node_is_what_the_classifier_reads(name):
    model = fs.create_model(name).eval()
    meta = fs.model_metadata(model)
    assert meta.embedding_node is not None
    assert meta.weights == "random" and meta.num_classes == fs.zoo.DEFAULT_NUM_CLASSES
    size = FAMILIES[name]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = _classifier_input(model, x)
        tapped = fs.FeatureTap(model, [meta.embedding_node])(x)[meta.embedding_node]
    torch.testing.assert_close(tapped.flatten(1), expected.flatten(1), rtol=0, atol=0)


@pytest.mark.parametrize(
    "name",
    sweep.params(["resnet18", "convnext_tiny", "swin_t", "vit_b_16", "densenet121"], _FAST[:1]),
)
def test_stage_nodes_are_tappable_and_shrink(name):
    model = fs.create_model(name).eval()
    stages = fs.model_metadata(model).stage_nodes
    assert len(stages) >= 2
    _, eval_nodes = fs.get_graph_node_names(model)
    assert set(stages) <= set(eval_nodes)
    size = fs.model_metadata(model).input_size[-1]
    with torch.no_grad():
        maps = fs.FeatureTap(model, list(stages))(torch.randn(1, 3, size, size))
    if not name.startswith("vit"):
        sides = [
            min(t.shape[-3:-1]) if name.startswith("swin") else t.shape[-1] for t in maps.values()
        ]
        assert sides == sorted(sides, reverse=True) and len(set(sides)) == len(sides)


def test_pretrained_weights_offline_name_file_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("FEATURESCOPE_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("featurescope tried to download while offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    with pytest.raises(fs.errors.WeightsUnavailableError) as info:
        fs.create_model("resnet18", pretrained=True)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    assert url.rsplit("/", 1)[-1] in str(info.value) and url in str(info.value)
    assert str(tmp_path / "hub" / "checkpoints") in str(info.value)


def test_pretrained_weights_load_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    torch.save(reference.state_dict(), cache / url.rsplit("/", 1)[-1])
    model = fs.create_model("resnet18", pretrained=True)
    meta = fs.model_metadata(model)
    assert meta.num_classes == 1000 and meta.weights == "torchvision:IMAGENET1K_V1"
    for (key, a), b in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), key
    assert not model.training
    finetune = fs.create_model("resnet18", pretrained=True, num_classes=3)
    assert finetune.fc.out_features == 3
    assert torch.equal(finetune.conv1.weight, reference.conv1.weight)


def test_a_plain_state_dict_checkpoint_gives_its_num_classes(tmp_path):
    net = torchvision.models.resnet18(num_classes=7)
    torch.save(net.state_dict(), tmp_path / "r18.pt")
    model = fs.create_model("resnet18", checkpoint=tmp_path / "r18.pt")
    assert model.fc.out_features == 7 and fs.model_metadata(model).num_classes == 7
    assert fs.model_metadata(model).weights.startswith("checkpoint:")


# --- timm -------------------------------------------------------------------------------------

timm = pytest.importorskip(
    "timm", reason="timm is not installed (pip install 'featurescope[timm]')"
)


def test_timm_models_are_listed_with_their_pretrained_cfg():
    names = fs.list_models("timm/*")
    assert "timm/resnet18" in names and len(names) > 500
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=timm.create_model("resnet18"))
    pre = fs.zoo.model_spec("timm/resnet18").preprocessing
    assert pre.input_size == cfg["input_size"] and pre.interpolation == cfg["interpolation"]
    assert pre.mean == cfg["mean"] and pre.std == cfg["std"]
    assert pre.resize == int(cfg["input_size"][-1] / cfg["crop_pct"])


@pytest.mark.parametrize(
    ("name", "size"), [("timm/resnet18", 64), ("timm/vit_tiny_patch16_224", 224)]
)
def test_timm_model_taps_its_embedding(name, size):
    model = fs.create_model(name).eval()
    node = fs.model_metadata(model).embedding_node
    if node is None:
        assert torch.__version__ < "2.9", (
            f"{name} has no embedding node on torch {torch.__version__}"
        )
        pytest.skip(f"torch.fx cannot trace {name} on torch {torch.__version__}: no node by rule")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        # Where torch.fx cannot trace a timm model (ViT's attention on torch 2.6), FeatureTap
        # falls back to hooks, saying so: the embedding node is a module there too.
        warnings.simplefilter("ignore", fs.FeaturescopeWarning)
        expected = _classifier_input(model, x)
        tapped = fs.FeatureTap(model, [node])(x)[node]
    torch.testing.assert_close(tapped.flatten(1), expected.flatten(1), rtol=0, atol=0)


def test_timm_pretrained_offline_from_a_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(fs.errors.WeightsUnavailableError, match="downloads are off"):
        fs.create_model("timm/resnet18", pretrained=True)
    cfg = timm.models.get_pretrained_cfg("resnet18")
    reference = timm.create_model("resnet18")
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / cfg.url.rsplit("/", 1)[-1])
    model = fs.create_model("timm/resnet18", pretrained=True)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert fs.model_metadata(model).num_classes == 1000
