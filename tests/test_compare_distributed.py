"""featurescope.compare under torch.distributed: two gloo ranks give the one-process matrix."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from _distributed import gloo_group, spawn_ranks

pytestmark = pytest.mark.distributed

# Batches of 32: nine of 32 and a last of 34 (the remainder of 2 joins it), 5 + 5 per rank;
# enough images for the 3 logits to be exact under "auto", the 100 relu features minibatch.
N = 322


class Net(nn.Module):
    """Two nodes per side: a narrow one (exact cells) and a wide one (minibatch cells)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def dataset(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 7, 7, generator=g))


def run(n: int = N, out: str | None = None):
    import featurescope as fs

    return fs.compare(
        Net(0).eval(),
        Net(1).eval(),
        dataset(n),
        nodes_a=["relu", "fc"],
        nodes_b=["relu", "fc"],
        batch_size=32 if n > 8 else 8,
        out=out,
        progress=False,
    )


def _worker(rank: int, init_method: str, world: int, out: str) -> None:
    with gloo_group(init_method, rank, world):
        torch.set_num_threads(1)
        results = {"whole": run(out=f"{out}/sums").to_dict(), "one_batch": run(n=6).to_dict()}
        with open(f"{out}/rank{rank}.json", "w") as fh:
            json.dump(results, fh)


def test_two_ranks_give_the_one_process_matrix(tmp_path):
    spawn_ranks(_worker, (2, str(tmp_path)), 2, tmp_path)
    single = run()
    assert {e for row in single.estimators for e in row} == {"exact", "minibatch"}
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        whole = got["whole"]
        torch.testing.assert_close(
            torch.tensor(whole["matrix"], dtype=torch.float64),
            single.matrix,
            rtol=1e-12,
            atol=1e-14,
        )
        assert whole["num_images"] == N and whole["num_batches"] == single.num_batches
        assert [tuple(r) for r in whole["estimators"]] == list(single.estimators)
        # One batch for two ranks: rank 1 has none and still joins the sums.
        one = torch.tensor(got["one_batch"]["matrix"], dtype=torch.float64)
        torch.testing.assert_close(one, run(n=6).matrix, rtol=1e-12, atol=1e-14)
    for rank in (0, 1):  # each rank kept its own sums, to resume from
        assert (tmp_path / "sums" / f"rank{rank}" / "sums.safetensors").is_file()
