"""What top_activations is checked against: a brute-force sort of every activation, and the
small tie-rich models and datasets the checks run on (shared by subprocesses and ranks)."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset


def tie_model(seed: int) -> nn.Module:
    """Integer weights on quantised images: many exactly equal activations."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 1)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-1, 2, p.shape, generator=g).float())
    return model.eval()


def tie_images(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n, 2, 6, 6), generator=g).float()


class Images(Dataset[tuple[torch.Tensor, int]]):
    """``(image, 0)`` pairs that note every index read, optionally slowly, or stop at one."""

    def __init__(
        self, images: torch.Tensor, *, delay: float = 0.0, stop_at: int | None = None
    ) -> None:
        self.images = images
        self.delay = delay
        self.stop_at = stop_at
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index == self.stop_at:
            raise KeyboardInterrupt  # an injected Ctrl-C, mid-run
        self.read.append(index)
        time.sleep(self.delay)
        return self.images[index], 0


def brute_force(maps: np.ndarray, k: int, reduce: str) -> tuple[np.ndarray, ...]:
    """``(values, image_ids, positions)`` per channel from one argsort of all its activations.

    Every activation of a channel is sorted by value (descending), then image, then position;
    an image counts once, at its first (strongest) place; under ``"mean"`` the images found are
    re-sorted by their mean, then image. Unfilled slots are ``-inf``, ``-1``, ``(-1, -1)``.
    """
    n, c, h, w = maps.shape
    values = np.full((c, k), -np.inf)
    ids = np.full((c, k), -1)
    positions = np.full((c, k, 2), -1)
    image = np.repeat(np.arange(n), h * w)
    position = np.tile(np.arange(h * w), n)
    for ch in range(c):
        value = maps[:, ch].reshape(-1).astype(np.float64)
        order = np.lexsort((position, image, -value))  # the last key sorts first
        _, first = np.unique(image[order], return_index=True)
        kept = order[np.sort(first)]  # each image's strongest activation, in rank order
        scores = value[kept]
        if reduce == "mean":
            scores = maps[image[kept], ch].reshape(len(kept), -1).mean(axis=1, dtype=np.float64)
            resort = np.lexsort((image[kept], -scores))
            kept, scores = kept[resort], scores[resort]
        kept, scores = kept[:k], scores[:k]
        values[ch, : len(kept)] = scores
        ids[ch, : len(kept)] = image[kept]
        positions[ch, : len(kept)] = np.stack([position[kept] // w, position[kept] % w], 1)
    return values, ids, positions


def assert_equals_brute_force(
    top: dict, model: nn.Module, images: torch.Tensor, k: int, reduce: str = "max"
) -> None:
    from featurescope.tap import FeatureTap

    nodes = list(top)
    with torch.no_grad():
        full = FeatureTap(model, nodes)(images)
    for node in nodes:
        values, ids, positions = brute_force(full[node].double().numpy(), k, reduce)
        got = top[node]
        np.testing.assert_array_equal(got.image_ids.numpy(), ids)
        np.testing.assert_array_equal(got.positions.numpy(), positions)
        np.testing.assert_allclose(got.values.double().numpy(), values, rtol=1e-6)
