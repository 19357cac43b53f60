"""top_activations against a brute-force sort of every activation, ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from _units_reference import brute_force as _brute
from _units_reference import tie_model as _model
from featurescope import FeaturescopeError, FeatureTap
from featurescope.units import TopActivations, merge_top_activations, top_activations


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 12),
    k=st.integers(1, 14),
    batch=st.integers(1, 5),
    reduce=st.sampled_from(["max", "mean"]),
)
def test_equals_the_brute_force(seed: int, n: int, k: int, batch: int, reduce: str) -> None:
    model = _model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.randint(0, 3, (n, 2, 6, 6), generator=g).float()
    top = top_activations(model, images, ["1", "3"], k=k, reduce=reduce, batch_size=batch)  # type: ignore[arg-type]
    full = FeatureTap(model, ["1", "3"])(images)
    for node in ("1", "3"):
        values, ids, positions = _brute(full[node].detach().double().numpy(), k, reduce)
        got = top[node]
        np.testing.assert_array_equal(got.image_ids.numpy(), ids)
        np.testing.assert_array_equal(got.positions.numpy(), positions)
        np.testing.assert_allclose(got.values.double().numpy(), values, rtol=1e-6)
        assert got.values.shape == (full[node].shape[1], k)


def test_shards_merge_exactly() -> None:
    model = _model(3)
    images = torch.randint(0, 3, (10, 2, 6, 6)).float()
    whole = top_activations(model, images, ["3"], k=4)["3"]
    parts = []
    for start, stop in ((0, 3), (3, 10)):
        part = top_activations(model, images[start:stop], ["3"], k=4)["3"]
        shifted = TopActivations(
            "3", part.values, part.image_ids + start, part.positions, part.grid, part.reduce
        )
        parts.append({"3": shifted})
    merged = merge_top_activations(parts[::-1])["3"]  # the order of the parts does not matter
    assert torch.equal(merged.image_ids, whole.image_ids)
    assert torch.equal(merged.positions, whole.positions)
    assert torch.equal(merged.values, whole.values)


class _Tokens(nn.Module):
    """A ViT's stem: 2x2 patches as tokens after a class token."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, 3, 2, stride=2)
        self.cls = nn.Parameter(torch.full((1, 1, 3), -100.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1)


def test_tokens_are_ranked_on_their_grid() -> None:
    model = _Tokens().eval()
    images = torch.rand(5, 1, 6, 6)
    top = top_activations(model, images, ["cat"], k=2)["cat"]
    maps = model.proj(images).detach()  # the same tokens as maps [N, 3, 3, 3]
    _, ids, positions = _brute(maps.double().numpy(), 2, "max")
    assert top.grid == (3, 3)
    np.testing.assert_array_equal(top.image_ids.numpy(), ids)
    np.testing.assert_array_equal(top.positions.numpy(), positions)


def test_a_dataset_of_pairs_and_bad_arguments() -> None:
    model = _model(0)
    images = torch.rand(4, 2, 6, 6)
    pairs = torch.utils.data.TensorDataset(images, torch.zeros(4))
    a = top_activations(model, pairs, ["3"], k=2, batch_size=3)["3"]
    b = top_activations(model, images, ["3"], k=2)["3"]
    assert torch.equal(a.image_ids, b.image_ids)
    with pytest.raises(FeaturescopeError, match="k must be"):
        top_activations(model, images, ["3"], k=0)
    with pytest.raises(FeaturescopeError, match="reduce"):
        top_activations(model, images, ["3"], reduce="min")  # type: ignore[arg-type]
