"""Grad-CAM's default node: a map larger than 1 × 1 whose gradient is its own, on every model.

The rule is checked against manual forwards that locate the expected map by hand (resnet's last
stage, ConvNeXt's last block, Swin's channels-first map after its norm, ViT's last ``ln_1``
tokens, a channels-last toy), then swept over every torchvision classification model: random
weights, a real photograph (``skimage.data.chelsea``) preprocessed with the model's own
normalisation at about the smallest input whose last stage is still larger than 1 × 1, one
thread. As in ``tests/test_tap_sweep.py``, a subset runs in the fast lane on every torch and the
other models are ``slow``, on the newest torch only; the largest are left out unless
``FEATURESCOPE_FULL_SWEEPS=1`` (``tests/_sweep.py`` says why).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import _sweep as sweep
import featurescope as fs
from featurescope.data import Preprocessing
from featurescope.tap import FeatureTap, grad_cam, last_spatial_node
from featurescope.tap._maps import read_layout
from featurescope.zoo import model_spec

#: The fast lane's model, swept on every torch; the rest are slow (``tests/_sweep.py``).
#: convnext_tiny, swin_t and vit_b_16 are checked on every torch by the reference tests below.
SUBSET = ("resnet18",)
#: Input sides other than 64 (where a stride-32 network's last map is 2 × 2).
_SIDE = {
    "alexnet": 127,  # at 63 its adaptive pool would copy one 1 × 1 value onto a 6 × 6 map
    "inception_v3": 139,  # its smallest input with a last map larger than 1 × 1
    "maxvit_t": 224,  # its 7 × 7 partitions need every stage's side divisible by 7
}


def _side(name: str) -> int:
    if name.startswith("vit_"):
        return 2 * int(name.rsplit("_", 1)[1])  # a 2 × 2 patch grid
    return _SIDE.get(name, 64)


def _build(name: str) -> nn.Module:
    kwargs = {"image_size": _side(name)} if name.startswith("vit_") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception init notices
        model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    if head and not head[0].weight.any():
        # torchvision makes a ViT's head all zeros, so every score is its bias and no gradient
        # flows back: nothing to explain. Random weights, as every other head has.
        nn.init.normal_(head[0].weight, std=0.02)
    return model


@pytest.fixture(scope="module")
def photo():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.chelsea())


def _input(name: str, photo) -> torch.Tensor:
    own = model_spec("tv_alexnet" if name == "alexnet" else name).preprocessing
    side = _side(name)
    prep = Preprocessing(side, side, own.mean, own.std, own.interpolation)
    return prep.transform()(photo)[None]


def _manual_cam(activation: torch.Tensor, score: torch.Tensor, size) -> torch.Tensor:
    """Grad-CAM from its definition on a ``[N, C, h, w]`` map that ``score`` was computed from."""
    (grad,) = torch.autograd.grad(score, activation)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.clamp((weights * activation).sum(1, keepdim=True), min=0)
    return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0].detach()


def _check_against(model, x, node_value, cam_expected, target):
    cam = grad_cam(model, x, target=target)
    tapped = FeatureTap(model, [cam.node])(x)[cam.node]
    torch.testing.assert_close(tapped, node_value.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cam.maps, cam_expected, rtol=1e-4, atol=1e-6)
    assert cam.node == last_spatial_node(model, tuple(x.shape[1:]))
    return cam


def test_resnet_default_is_its_last_stage_not_the_pooled_map(one_thread, photo):
    model = _build("resnet18")
    x = _input("resnet18", photo)
    with torch.enable_grad():
        m = model
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        a = m.layer4(m.layer3(m.layer2(m.layer1(h))))
        score = m.fc(torch.flatten(m.avgpool(a), 1))[0, 7]
        expected = _manual_cam(a, score, x.shape[-2:])
    cam = _check_against(model, x, a, expected, 7)
    assert (cam.layout, cam.grid) == ("chw", (2, 2))


def test_convnext_default_is_its_last_block(one_thread, photo):
    model = _build("convnext_tiny")
    x = _input("convnext_tiny", photo)
    with torch.enable_grad():
        a = model.features(x)
        score = model.classifier(model.avgpool(a))[0, 3]
        expected = _manual_cam(a, score, x.shape[-2:])
    cam = _check_against(model, x, a, expected, 3)
    assert cam.grid == (2, 2)


def test_swin_default_is_its_map_after_the_norm(one_thread, photo):
    model = _build("swin_t")
    x = _input("swin_t", photo)
    with torch.enable_grad():
        a = model.permute(model.norm(model.features(x)))  # channels-first [N, C, h, w]
        score = model.head(model.flatten(model.avgpool(a)))[0, 5]
        expected = _manual_cam(a, score, x.shape[-2:])
    _check_against(model, x, a, expected, 5)


def test_vit_default_is_the_tokens_its_last_attention_reads(one_thread, photo):
    model = _build("vit_b_16")
    x = _input("vit_b_16", photo)
    encoder = model.encoder
    with torch.enable_grad():
        tokens = model._process_input(x)
        tokens = torch.cat([model.class_token.expand(1, -1, -1), tokens], dim=1)
        tokens = encoder.dropout(tokens + encoder.pos_embedding)
        for layer in list(encoder.layers)[:-1]:
            tokens = layer(tokens)
        last = encoder.layers[-1]
        read = last.ln_1(tokens)  # what the last attention reads: every token reaches the head
        y = last.dropout(last.self_attention(read, read, read, need_weights=False)[0]) + tokens
        y = y + last.mlp(last.ln_2(y))
        score = model.heads(encoder.ln(y)[:, 0])[0, 2]
        grid = read[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)  # class token dropped
        (grad,) = torch.autograd.grad(score, read)
    grad = grad[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    cam = torch.clamp((grad.mean(dim=(2, 3), keepdim=True) * grid).sum(1, keepdim=True), min=0)
    expected = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    got = _check_against(model, x, read, expected.detach(), 2)
    assert (got.layout, got.grid) == ("tokens", (2, 2))


class _ChannelsLast(nn.Module):
    """Channels-last blocks (as ConvNeXt's and Swin's), pooled over their spatial axes."""

    def __init__(self) -> None:
        super().__init__()
        self.patchify = nn.Conv2d(3, 12, 4, stride=4)
        self.a_rather_long_stage_name_for_a_title = nn.LayerNorm(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        a = self.a_rather_long_stage_name_for_a_title(self.patchify(x).permute(0, 2, 3, 1))
        return self.head(a.mean(dim=(1, 2)))


def test_channels_last_map_is_found_and_weighed_over_its_spatial_axes(one_thread):
    torch.manual_seed(3)
    model = _ChannelsLast().eval()
    x = torch.randn(2, 3, 20, 28)  # non-square: the spatial axes are told apart by the input
    with torch.enable_grad():
        a = model.a_rather_long_stage_name_for_a_title(model.patchify(x).permute(0, 2, 3, 1))
        chw = a.permute(0, 3, 1, 2)
        scores = model.head(chw.mean(dim=(2, 3)))
        expected = _manual_cam(chw, scores[:, 4].sum(), x.shape[-2:])
    cam = grad_cam(model, x, target=4)
    assert (cam.node, cam.layout, cam.grid) == (
        "a_rather_long_stage_name_for_a_title",
        "hwc",
        (5, 7),
    )
    torch.testing.assert_close(cam.maps, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(fs.errors.InputShapeError, match="layout='tokens'"):
        grad_cam(model, x, node=cam.node, layout="tokens")


def test_no_map_larger_than_one_pixel_is_a_clear_error(one_thread):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    ).eval()
    with pytest.raises(fs.FeaturescopeError, match="larger input"):
        last_spatial_node(model, (3, 4, 4))  # the conv's map is 1 × 1
    assert last_spatial_node(model, (3, 5, 5)) == "0"  # 2 × 2
    with pytest.raises(fs.errors.InputShapeError, match="cannot run"):
        last_spatial_node(model, (3, 2, 2))  # smaller than the kernel


@given(
    stride=st.integers(1, 32),
    h=st.integers(2, 12),
    w=st.integers(2, 12),
    extra=st.integers(3, 600),
)
def test_map_layout_is_read_against_the_input(stride, h, w, extra):
    image = (h * stride, w * stride)
    channels = max(h, w) + extra  # more channels than a side, as in every network
    chw = read_layout((1, channels, h, w), image)
    hwc = read_layout((1, h, w, channels), image)
    assert chw is not None and (chw.kind, chw.grid) == ("chw", (h, w))
    assert hwc is not None and (hwc.kind, hwc.grid) == ("hwc", (h, w))


@given(grid=st.integers(3, 24), patch=st.integers(2, 32), prefix=st.integers(0, 1))
def test_token_layout_is_the_patch_grid(grid, patch, prefix):
    found = read_layout((1, grid * grid + prefix, 64), (grid * patch, grid * patch))
    assert found is not None
    assert (found.kind, found.grid, found.prefix) == ("tokens", (grid, grid), prefix)


def test_gradcam_title_is_never_clipped(one_thread):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    torch.manual_seed(0)
    model = _ChannelsLast().eval()
    for size, dpi in ((2.4, 72), (4.0, 100)):
        figure = fs.visualize(
            "gradcam", torch.randn(3, 20, 28), model=model, class_names=["tabby cat"] * 5, size=size
        )
        figure.set_dpi(dpi)
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        ax = figure.axes[0]
        title = ax.title
        whole = "Grad-CAM: tabby cat (a_rather_long_stage_name_for_a_title)"
        assert re.sub(r"\s", "", title.get_text()) == re.sub(r"\s", "", whole)
        box = title.get_window_extent(canvas.get_renderer())
        assert box.x0 >= 0 and box.x1 <= figure.bbox.width, (box, figure.bbox)
        assert box.y1 <= figure.bbox.height and box.y0 >= ax.get_window_extent().y1 - 1


def _models() -> list:
    return sweep.params(sweep.torchvision_classifiers(), SUBSET)


@pytest.mark.timeout(900)  # the largest models take minutes on a busy 2-core machine
@pytest.mark.parametrize("name", _models())
def test_default_grad_cam_explains_every_torchvision_model(name, photo, one_thread):
    model = _build(name)
    x = _input(name, photo)
    cam = grad_cam(model, x)
    # The node's output, tapped on its own, is a map larger than 1 × 1 over the image.
    with torch.no_grad():
        value = FeatureTap(model, [cam.node])(x)[cam.node]
    shape = tuple(value.shape)
    grid = {"chw": shape[2:], "hwc": shape[1:3], "tokens": cam.grid}[cam.layout]
    assert grid == cam.grid and grid[0] * grid[1] > 1, (name, cam.node, shape)
    if cam.layout == "tokens":
        assert shape[1] - grid[0] * grid[1] in range(6), (name, shape)
    # Not constant. A random network's map for one class may be all zeros after the ReLU
    # (every position weighs negative), so the next most likely classes are tried too.
    ranked = cam.scores[0].argsort(descending=True).tolist()
    maps = cam.maps[0]
    for target in ranked[1:5]:
        if float(maps.max()) > 0:
            break
        maps = grad_cam(model, x, node=cam.node, target=target).maps[0]
    spread = float(maps.double().std() / maps.double().mean())
    assert spread > 1e-2, (name, cam.node, spread)
