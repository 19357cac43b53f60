"""Receptive fields checked against the support of the gradient (``tests/_receptive_truth.py``).

Small models cover every op the analysis follows; a hypothesis test draws convolution and
pooling chains; the textbook recursion (Araujo et al., Distill 2019) checks stride, size and
offset. Every torchvision classification model is swept in ``test_receptive_sweep.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from _receptive_truth import support_boxes
from featurescope import FeaturescopeError
from featurescope.errors import NodeNotFoundError
from featurescope.tap import receptive_field, receptive_fields


def _check(
    model: nn.Module, size: tuple[int, int], nodes: list[str] | None = None, **kw: object
) -> None:
    """Border and middle positions of every asked node: the box equals the gradient's support."""
    fields = receptive_fields(model, nodes, size, **kw)  # type: ignore[arg-type]
    queries = []
    for name, rf in fields.items():
        if rf.is_global:
            queries.append((name, -1, -1, None))
            continue
        assert rf.output_size is not None
        h, w = rf.output_size
        rows, cols = (
            sorted({0, 1, h // 2, h - 1} & set(range(h))),
            sorted({0, 1, w // 2, w - 1} & set(range(w))),
        )
        queries += [(name, i, j, rf.dims) for i in rows for j in cols]
    truth = support_boxes(model, size, queries)
    for (name, i, j, _), box in zip(queries, truth, strict=True):
        rf = fields[name]
        expected = (0, 0, *size) if rf.is_global else rf.box(i, j)
        if box is None:  # a window wholly in the padding reads nothing
            assert expected[0] == expected[2] or expected[1] == expected[3], (name, i, j)
        else:
            assert box == expected, f"{name} at {(i, j)}: {expected} but the gradient says {box}"


class _Branches(nn.Module):
    """Residual joins of different fields, concatenation, strided slices and upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 5, stride=1, padding=2, dilation=1)
        self.c = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=4)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.a(x))
        s = a + self.b(x)  # union of a 3x3 and a 5x5 field
        cat = torch.cat([s, a[:, :, :, :]], dim=1)
        c = self.c(cat)
        p = self.pool(c)
        sliced = p[:, :, 1::2, :]
        u = self.up(p)
        bil = F.interpolate(c, scale_factor=1.5, mode="bilinear", align_corners=False)
        return sliced.sum() + u.sum() + bil.sum()


def test_branches_slices_and_upsampling_match_the_gradient() -> None:
    model = _Branches().eval()
    names = ["a", "add", "cat", "c", "pool", "getitem", "up", "interpolate"]
    _check(model, (13, 11), names)


class _ChannelsLast(nn.Module):
    """ConvNeXt's block: a permute to channel-last, LayerNorm and Linear over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(3, 3, 7, padding=3, groups=3)
        self.norm = nn.LayerNorm(3)
        self.fc = nn.Linear(3, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.norm(self.dw(x).permute(0, 2, 3, 1)))
        return y.permute(0, 3, 1, 2)


def test_channel_last_blocks_stay_local() -> None:
    model = _ChannelsLast().eval()
    fields = receptive_fields(model, ["fc", "permute_1"], (12, 12))
    assert fields["fc"].dims == (1, 2) and fields["permute_1"].dims == (2, 3)
    _check(model, (12, 12), ["norm", "fc", "permute_1"])


class _SqueezeExcite(nn.Module):
    def __init__(self, detach: bool = False) -> None:
        super().__init__()
        self.detach = detach
        self.conv = nn.Conv2d(3, 4, 3)
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(4, 4, 1)
        self.after = nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        gate = torch.sigmoid(self.fc(self.squeeze(y)))
        return self.after(y * (gate.detach() if self.detach else gate))


def test_squeeze_excitation_gates_are_global_or_set_aside_when_asked() -> None:
    model = _SqueezeExcite().eval()
    assert receptive_field(model, "mul", (10, 10)).is_global
    _check(model, (10, 10), ["squeeze", "mul", "after"])
    local = receptive_field(model, "after", (10, 10), gates="local")
    assert not local.is_global and local.gates == ("sigmoid",)
    # The local box is the field of the main path alone: the gradient with the gate detached.
    detached = _SqueezeExcite(detach=True).eval()
    detached.load_state_dict(model.state_dict())
    h, w = local.output_size or (0, 0)
    queries = [("after", i, j, (2, 3)) for i in range(h) for j in range(w)]
    truth = support_boxes(detached, (10, 10), queries)
    assert truth == [local.box(i, j) for _, i, j, _ in queries]


def test_flatten_then_linear_is_global_and_flatten_has_no_grid() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 5)).eval()
    assert receptive_field(model, "2", (8, 8)).is_global
    assert receptive_field(model, "2", (8, 8)).box(0, 0) == (0, 0, 8, 8)
    with pytest.raises(FeaturescopeError, match="no spatial grid"):
        receptive_field(model, "1", (8, 8))
    assert "1" not in receptive_fields(model, None, (8, 8))


def _checked(x: torch.Tensor) -> torch.Tensor:
    """A check wrapped with torch.fx.wrap, as the study's AlexNet checks its input's size."""
    if x.shape[-1] < 4:
        raise ValueError("too small")
    return x


torch.fx.wrap("_checked")


class _Checks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_checked(x))


def test_an_unknown_function_that_returns_its_input_untouched_is_the_identity() -> None:
    _check(_Checks().eval(), (9, 9), ["_checked", "conv"])
    assert receptive_field(_Checks(), "conv", (9, 9)).size == (3.0, 3.0)


def test_swin_shifted_windows_match_the_gradient_at_every_position() -> None:
    torchvision = pytest.importorskip("torchvision")
    # 18x18 pixels: 9x9 tokens in 3x3 windows shifted by 1, then 5x5 tokens padded to 6x6
    # (two windows a side, shifted by 1): wrapped regions, padding and an odd patch merge.
    model = torchvision.models.SwinTransformer(
        patch_size=[2, 2], embed_dim=8, depths=[2, 2], num_heads=[1, 1], window_size=[3, 3]
    ).eval()
    attn = [f"features.{s}.{b}.attn.shifted_window_attention" for s in (1, 3) for b in (0, 1)]
    nodes = [*attn, "features.2._patch_merging_pad", "features.3.1.add_1", "avgpool"]
    fields = receptive_fields(model, nodes, (18, 18))
    queries = []
    for name in nodes[:-1]:
        h, w = fields[name].output_size or (0, 0)
        queries += [(name, i, j, fields[name].dims) for i in range(h) for j in range(w)]
    truth = support_boxes(model, (18, 18), queries)
    assert truth == [fields[name].box(i, j) for name, i, j, _ in queries]
    assert fields["avgpool"].is_global
    # The shift is real: the shifted block's rows differ from the plain block's, and the mask
    # (-100, not -inf) lets the wrapped token 0 read its whole rolled window, both image edges.
    plain, shifted = (fields[attn[k]].rows.tolist() for k in (0, 1))
    assert plain[0] == [0, 6] and shifted[0] == [0, 18] and shifted[1] == [0, 12]


class _Rolls(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, 1, dims=2)


def test_an_unknown_op_is_named() -> None:
    with pytest.raises(FeaturescopeError, match=r"runs roll at node 'roll'"):
        receptive_field(_Rolls(), "roll", (8, 8))


def test_unknown_nodes_and_bad_sizes_are_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 3))
    with pytest.raises(NodeNotFoundError, match="Did you mean"):
        receptive_field(model, "01", (8, 8))
    with pytest.raises(FeaturescopeError, match="input_size"):
        receptive_field(model, "0", (8,))
    with pytest.raises(FeaturescopeError, match="outside"):
        receptive_field(model, "0", (8, 8)).box(6, 0)


_layer = st.tuples(
    st.sampled_from(["conv", "max", "avg"]),
    st.integers(1, 4),  # kernel
    st.integers(1, 3),  # stride
    st.integers(0, 2),  # padding
    st.integers(1, 2),  # dilation
    st.booleans(),  # ceil mode
)


def _chain(layers: list[tuple[str, int, int, int, int, bool]]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for kind, k, s, p, d, ceil in layers:
        p = min(p, k // 2)  # pooling allows at most half the kernel
        if kind == "conv":
            mods.append(nn.Conv2d(3, 3, k, stride=s, padding=p, dilation=d))
        elif kind == "max":
            mods.append(nn.MaxPool2d(k, s, p, ceil_mode=ceil))
        else:
            mods.append(nn.AvgPool2d(k, s, p, ceil_mode=ceil))
    return nn.Sequential(*mods).eval()


@settings(max_examples=15, deadline=None)
@given(st.lists(_layer, min_size=1, max_size=4), st.integers(12, 24), st.integers(12, 24))
def test_random_chains_match_the_gradient_and_the_textbook(
    layers: list[tuple[str, int, int, int, int, bool]], h: int, w: int
) -> None:
    model = _chain(layers)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, h, w))
    except RuntimeError:
        return  # the chain shrinks the image to nothing
    last = str(len(layers) - 1)
    _check(model, (h, w), [last])
    # Araujo et al.: r = 1 + sum (k_l - 1) prod_{i<l} s_i ; offset = -sum p_l prod_{i<l} s_i.
    stride, size, offset = 1, 1, 0
    for kind, k, s, p, d, _ in layers:
        p = min(p, k // 2)
        k_eff = (k - 1) * (d if kind == "conv" else 1) + 1
        size += (k_eff - 1) * stride
        offset -= p * stride
        stride *= s
    rf = receptive_field(model, last, (h, w))
    assert rf.stride == (stride, stride) and rf.size == (size, size)
    assert rf.offset == (offset, offset)


def test_resnet18_sampled_nodes_match_the_gradient() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    nodes = ["maxpool", "layer1.0.add", "layer2.0.downsample.0", "layer2.1.relu_1", "avgpool", "fc"]
    _check(model, (20, 20), nodes)
