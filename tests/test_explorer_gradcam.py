"""Grad-CAM against a manual autograd computation, and the ``gradcam`` visualizer plugin."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featurescope as fs
from featurescope.tap import last_spatial_node


def _manual_cam(features: nn.Module, head: nn.Module, images: torch.Tensor, target=None):
    """Grad-CAM by hand: split the model at the node, retain the activation's gradient."""
    activation = features(images)
    activation.retain_grad()
    scores = head(activation)
    classes = scores.argmax(1) if target is None else torch.as_tensor(target).expand(len(images))
    scores.gather(1, classes[:, None]).sum().backward()
    weights = activation.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.clamp((weights * activation).sum(1, keepdim=True), min=0)
    return F.interpolate(cam, size=images.shape[-2:], mode="bilinear")[:, 0].detach(), classes


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.Tanh()
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 7 * 7, 4))

    def forward(self, x):
        return self.head(self.body(x))


def test_grad_cam_matches_a_manual_autograd_computation():
    torch.manual_seed(1)
    model = Small().eval()
    images = torch.randn(3, 3, 16, 16)
    cam = fs.grad_cam(model, images, node="body.3")
    expected, classes = _manual_cam(model.body, model.head, images)
    torch.testing.assert_close(cam.maps, expected, rtol=1e-5, atol=1e-6)
    assert cam.targets.tolist() == classes.tolist()
    torch.testing.assert_close(cam.scores, model(images).detach())
    assert cam.maps.shape == (3, 16, 16)
    for target in range(4):
        expected, _ = _manual_cam(model.body, model.head, images, target)
        torch.testing.assert_close(
            fs.grad_cam(model, images, node="body.3", target=target).maps, expected
        )


def test_default_node_on_the_zoo_alexnet_is_its_last_conv_stage():
    model = fs.create_model("alexnet_half").eval()
    images = torch.randn(2, 3, 227, 227)
    assert last_spatial_node(model, (3, 227, 227)) == "conv3.6"
    cam = fs.grad_cam(model, images, target=[1, 3])
    head = nn.Sequential(nn.Flatten(), model.fc)
    features = nn.Sequential(model.conv1, model.conv2, model.conv3)
    expected = torch.stack(
        [_manual_cam(features, head, images[i : i + 1], t)[0][0] for i, t in enumerate((1, 3))]
    )
    torch.testing.assert_close(cam.maps, expected, rtol=1e-4, atol=1e-5)
    assert cam.targets.tolist() == [1, 3]
    assert cam.node == "conv3.6"


def test_grad_cam_leaves_the_model_as_it_was():
    model = Small().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fs.grad_cam(model, torch.randn(1, 3, 16, 16), node="body.3")
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grad_cam_refuses_what_it_cannot_explain():
    model = Small().eval()
    with pytest.raises(fs.FeaturescopeError, match="target"):
        fs.grad_cam(model, torch.randn(1, 3, 16, 16), node="body.3", target=9)
    with pytest.raises(fs.errors.InputShapeError, match=r"\[N, C, h, w\]"):
        fs.grad_cam(model, torch.randn(1, 3, 16, 16), node="head.0")
    with pytest.raises(fs.errors.InputShapeError):
        fs.grad_cam(model, torch.randn(16, 16))
    with pytest.raises(fs.FeaturescopeError, match="in-place"):
        fs.grad_cam(_Scaled().eval(), torch.randn(1, 3, 16, 16), node="conv")


class _Scaled(nn.Module):
    """A conv whose output ``mul_`` overwrites: the tap must copy it, so it has no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 14 * 14, 2))

    def forward(self, x):
        a = self.conv(x)
        a.mul_(2.0)
        return self.head(a)


def test_grad_cam_of_a_node_an_in_place_activation_overwrites_is_its_own_gradient():
    """The tap runs ``ReLU(inplace=True)`` out of place, so the conv keeps its own output."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 14 * 14, 2)
    ).eval()
    images = torch.randn(2, 3, 16, 16)
    cam = fs.grad_cam(model, images, node="0", target=1)
    head = nn.Sequential(nn.ReLU(), nn.Flatten(), model[3])
    expected, _ = _manual_cam(model[0], head, images, 1)
    torch.testing.assert_close(cam.maps, expected, rtol=1e-5, atol=1e-6)
    assert model[1].inplace


def test_gradcam_visualizer_is_a_builtin_plugin(tmp_path):
    assert "gradcam" in fs.visualizers.list_visualizers()
    model = fs.create_model("alexnet", class_names=["a", "b", "c", "d", "e"])
    image = torch.randn(3, 227, 227)
    figure = fs.visualize("gradcam", image, model=model)
    predicted = int(model.eval()(image[None]).argmax())
    assert figure.axes[0].get_title() == f"Grad-CAM: {'abcde'[predicted]} (conv3.6)"
    drawn = figure.axes[0].images[-1].get_array()
    cam = fs.grad_cam(model, image[None]).maps[0]
    expected = (cam - cam.min()) / (cam.max() - cam.min())
    torch.testing.assert_close(torch.as_tensor(drawn, dtype=torch.float64), expected.double())
    fs.visualizers.save(figure, tmp_path / "cam.png")
    with pytest.raises(fs.errors.VisualizationError, match=r"\[3, H, W\]"):
        fs.visualize("gradcam", torch.randn(2, 3, 8, 8), model=model)
