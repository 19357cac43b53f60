"""The ``units`` visualizer: registered as a builtin, draws patches beside signed projections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import featurescope as fs
from featurescope.visualizers.units import _signed


def test_draws_the_top_patches_and_projections_of_a_pipeline() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)).eval()
    images = torch.rand(5, 3, 10, 10)
    top = fs.units.top_activations(model, images, ["2"], k=3)["2"]
    rf = fs.tap.receptive_field(model, "2", (10, 10))
    patches, projections = [], []
    for c in (0, 2):
        row, prow = [], []
        for r in range(3):
            image = images[int(top.image_ids[c, r])]
            i, j = top.positions[c, r].tolist()
            t, left, b, right = rf.box(i, j)
            row.append(fs.units.patch(image, (t, left, b, right)))
            prow.append(fs.units.project(model, image, "2", c, (i, j))[:, t:b, left:right])
        patches.append(row)
        projections.append(prow)
    fig = fs.visualize("units", patches, projections=projections, channels=[0, 2], title="conv")
    assert len(fig.axes) == 2 * 3 * 2
    assert fig.axes[0].get_title(loc="left") == "channel 0"
    assert "units" in fs.visualizers.list_visualizers()


def test_projections_are_drawn_signed_around_grey() -> None:
    shown = _signed(np.array([[-2.0, 0.0, 1.0]]))
    np.testing.assert_allclose(shown, [[0.0, 0.5, 0.75]])


def test_mismatched_projections_and_no_channels_are_refused() -> None:
    patches = [[torch.rand(3, 4, 4)] * 2]
    with pytest.raises(fs.FeaturescopeError, match="pair with the patches"):
        fs.visualize("units", patches, projections=[[torch.rand(3, 4, 4)]])
    with pytest.raises(fs.FeaturescopeError, match="at least one channel"):
        fs.visualize("units", [])
