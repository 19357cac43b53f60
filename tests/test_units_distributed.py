"""top_activations on two gloo ranks (127.0.0.1): each ranks its part, the merge is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _distributed import gloo_group, spawn_ranks
from _units_reference import Images, assert_equals_brute_force, tie_images, tie_model
from featurescope.units import top_activations

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

N = 11  # odd: the DistributedSampler pads one rank's part, which must not be ranked twice
NODES = ["1", "3"]


def _worker(rank: int, init_method: str, world: int, out: str) -> None:
    with gloo_group(init_method, rank, world):
        torch.set_num_threads(1)
        data = Images(tie_images(5, N))
        top = top_activations(tie_model(5), data, NODES, k=4, batch_size=2, out=out)
        expected = list(range(rank, N, world))  # this rank's part, each sample once
        if sorted(set(data.read)) != expected:
            raise AssertionError(f"rank {rank} read {data.read}, not {expected}")
        again = Images(tie_images(5, N))  # a finished run is read back, merged again
        same = top_activations(tie_model(5), again, NODES, k=4, batch_size=2, out=out)
        if len(again.read) > 1:
            raise AssertionError(f"rank {rank} read {again.read} after the run had finished")
        in_memory = top_activations(tie_model(5), Images(tie_images(5, N)), NODES, k=4)
        torch.save({"out": top, "again": same, "memory": in_memory}, f"{out}.rank{rank}.pt")


def test_two_ranks_give_the_one_process_answer(tmp_path: Path) -> None:
    out = tmp_path / "top"
    spawn_ranks(_worker, (2, str(out)), 2, tmp_path)
    single = top_activations(tie_model(5), tie_images(5, N), NODES, k=4, batch_size=3)
    assert_equals_brute_force(single, tie_model(5), tie_images(5, N), k=4)
    assert sorted(p.name for p in out.iterdir()) == ["rank0", "rank1"]
    for rank in (0, 1):
        results = torch.load(tmp_path / f"top.rank{rank}.pt", weights_only=False)
        for name, result in results.items():
            for node in NODES:
                got, want = result[node], single[node]
                assert torch.equal(got.image_ids, want.image_ids), (rank, name, node)
                assert torch.equal(got.positions, want.positions), (rank, name, node)
                assert torch.equal(got.values, want.values), (rank, name, node)
