"""FeatureTap.extract under torch.distributed: two gloo processes on 127.0.0.1, one shard each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _distributed import gloo_group, spawn_ranks
from featurescope.tap import FeatureTap, load_features

pytestmark = pytest.mark.distributed

N = 7  # odd: the DistributedSampler pads one rank's part, which must not be written twice
NODES = {"0": "conv", "3": "logits"}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 2, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).eval()


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 3, 6, 6, generator=g), torch.arange(N))


def _worker(rank: int, init_method: str, world: int, out: str) -> None:
    with gloo_group(init_method, rank, world):
        torch.set_num_threads(1)
        result = FeatureTap(tiny_model(), NODES).extract(
            dataset(), batch_size=2, out=out, progress=False
        )
        expected = list(range(rank, N, world))
        if list(result.sample_ids) != expected:
            raise AssertionError(f"rank {rank} extracted {list(result.sample_ids)}")
        # A shuffling DataLoader draws differently on each rank; the ranks must split one draw.
        torch.manual_seed(100 + rank)
        loader = DataLoader(dataset(), batch_size=2, shuffle=True)
        shuffled = FeatureTap(tiny_model(), NODES).extract(loader, progress=False)
        with open(f"{out}.ids{rank}.json", "w") as fh:
            json.dump([int(i) for i in shuffled.sample_ids], fh)


def test_two_ranks_write_shards_that_merge_into_the_whole(tmp_path):
    out = tmp_path / "features"
    spawn_ranks(_worker, (2, str(out)), 2, tmp_path)

    shards = [json.loads((out / f"rank{r}" / "manifest.json").read_text()) for r in (0, 1)]
    assert [s["sample_ids"] for s in shards] == [[0, 2, 4, 6], [1, 3, 5]]
    assert [(s["rank"], s["world_size"]) for s in shards] == [(0, 2), (1, 2)]
    merged = json.loads((out / "manifest.json").read_text())
    assert merged["num_samples"] == merged["completed"] == N
    assert [s["dir"] for s in merged["shards"]] == ["rank0", "rank1"]

    parts = [json.loads((tmp_path / f"features.ids{r}.json").read_text()) for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == list(range(N))  # each sample once, on one rank

    whole = load_features(out)
    single = FeatureTap(tiny_model(), NODES).extract(dataset(), batch_size=3, progress=False)
    np.testing.assert_array_equal(whole.sample_ids, np.arange(N))
    np.testing.assert_array_equal(whole.labels, np.arange(N))
    for alias in NODES.values():
        np.testing.assert_allclose(whole[alias], single[alias], rtol=1e-5, atol=1e-6)
