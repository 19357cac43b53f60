"""Deconvnet and guided-backprop projections against Captum's and the plain gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featurescope import FeaturescopeError
from featurescope.tap import receptive_field
from featurescope.units import patch, project, top_activations

captum_attr = pytest.importorskip("captum.attr")


def _layers(inplace: bool) -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(8, 5, 1),
    ]


class _Functional(nn.Module):
    """The same network with functional and in-place ReLUs, as torchvision writes them."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.c1, self.pool, self.c2, self.c3 = seq[0], seq[2], seq[3], seq[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu_(self.c1(x)))
        return self.c3(nn.functional.relu(self.c2(x), inplace=True))


@pytest.mark.filterwarnings("ignore::UserWarning:captum")
@pytest.mark.parametrize(
    ("method", "captum"), [("deconvnet", "Deconvolution"), ("guided", "GuidedBackprop")]
)
def test_matches_captum_for_one_activation(method: str, captum: str) -> None:
    reference = nn.Sequential(*_layers(inplace=False)).eval()
    ours_inplace = nn.Sequential(*_layers(inplace=True)).eval()
    functional = _Functional(ours_inplace).eval()
    image = torch.randn(3, 12, 12)
    channel, position = 3, (1, 2)
    explainer = getattr(captum_attr, captum)(reference)
    theirs = explainer.attribute(image[None].clone(), target=(channel, *position))[0]
    before = [p.clone() for p in ours_inplace.parameters()]
    for model, node in ((ours_inplace, "5"), (functional, "c3")):
        ours = project(model, image, node, channel, position, method=method)  # type: ignore[arg-type]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, ours_inplace.parameters(), strict=True))
    assert not any(isinstance(m, nn.ReLU) and not m.inplace for m in ours_inplace.modules())


def test_without_relus_every_method_is_the_gradient() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(4, 2, 2)).eval()
    image = torch.randn(3, 10, 10)
    x = image[None].clone().requires_grad_(True)
    out = model(x)[0, 1, 2, 1]
    (grad,) = torch.autograd.grad(out, x)
    expected = grad[0]
    for method in ("deconvnet", "guided", "gradient"):
        got = project(model, image, "3", 1, (2, 1), method=method)  # type: ignore[arg-type]
        torch.testing.assert_close(got, expected)


def test_deconvnet_differs_from_the_gradient_where_relus_gate() -> None:
    model = nn.Sequential(*_layers(inplace=True)).eval()
    image = torch.randn(3, 12, 12)
    deconv = project(model, image, "5", 0, (0, 0))
    plain = project(model, image, "5", 0, (0, 0), method="gradient")
    assert not torch.allclose(deconv, plain)


def test_bad_method_and_position() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 3))
    with pytest.raises(FeaturescopeError, match="method"):
        project(model, torch.rand(3, 5, 5), "0", 0, method="lrp")  # type: ignore[arg-type]
    with pytest.raises(FeaturescopeError, match="off node"):
        project(model, torch.rand(3, 5, 5), "0", 0, (3, 0))


def test_patch_is_the_box_of_the_unnormalised_image() -> None:
    raw = torch.rand(3, 10, 12)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normalised = (raw - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    got = patch(normalised, (2, 3, 7, 12), mean=mean, std=std)
    torch.testing.assert_close(got, raw[:, 2:7, 3:12])
    assert torch.equal(patch(raw, (0, 0, 1, 1)), raw[:, :1, :1])


def test_the_top_patch_holds_what_the_activation_reads() -> None:
    """The receptive-field patch at a top activation reproduces that activation exactly."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 2, 2)).eval()
    images = torch.rand(6, 3, 11, 11)
    top = top_activations(model, images, ["2"], k=1)["2"]
    rf = receptive_field(model, "2", (11, 11))
    for channel in range(2):
        i, j = top.positions[channel, 0].tolist()
        crop = patch(images[int(top.image_ids[channel, 0])], rf.box(i, j))
        with torch.no_grad():
            alone = model(crop[None])[0, channel, 0, 0]
        torch.testing.assert_close(alone, top.values[channel, 0])


@pytest.mark.filterwarnings("ignore::UserWarning:captum")
@pytest.mark.parametrize(
    ("method", "captum"), [("deconvnet", "Deconvolution"), ("guided", "GuidedBackprop")]
)
def test_a_batch_of_projections_is_each_alone(method: str, captum: str) -> None:
    from featurescope.units import projections

    torch.manual_seed(2)
    layers = _layers(inplace=True)
    layers.insert(1, nn.BatchNorm2d(6))  # in training mode it would mix the images
    model = nn.Sequential(*layers).train()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
    images = torch.randn(4, 3, 12, 12)
    channels, positions = [3, 0, 4, 3], [(1, 2), (0, 0), (3, 3), (1, 2)]
    batch = projections(model, images, "6", channels, positions, method=method)  # type: ignore[arg-type]
    assert model.training and model[1].training  # the modes are restored
    reference = nn.Sequential(*_layers(inplace=False)[:1], model[1], *_layers(inplace=False)[1:])
    explainer = getattr(captum_attr, captum)(reference.eval())
    for b in range(4):
        alone = project(model, images[b], "6", channels[b], positions[b], method=method)  # type: ignore[arg-type]
        torch.testing.assert_close(batch[b], alone, rtol=1e-5, atol=1e-6)
        target = (channels[b], *positions[b])
        theirs = explainer.attribute(images[b : b + 1].clone(), target=target)[0]
        torch.testing.assert_close(batch[b], theirs, rtol=1e-5, atol=1e-6)
    with pytest.raises(FeaturescopeError, match="one channel and one position per image"):
        projections(model, images, "6", [0], [(0, 0)])
    with pytest.raises(FeaturescopeError, match=r"\(0, 9, 0\) is off"):
        projections(model, images[:1], "6", [0], [(9, 0)])
