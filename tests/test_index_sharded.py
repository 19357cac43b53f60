"""ShardedEmbeddingIndex on two CPU processes (gloo over 127.0.0.1) equals one whole index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import featurescope as fs
from _distributed import gloo_group, spawn_ranks
from featurescope.errors import EmbeddingIndexError

pytestmark = pytest.mark.distributed

WORLD = 2


def _data():
    rng = np.random.default_rng(7)
    base = rng.standard_normal((40, 6)).astype(np.float32)
    # Duplicates across shards: ties must go to the smaller global id on every rank.
    g = np.concatenate([base, base[:15], 1000.0 + base[:5]]).astype(np.float32)
    ids = rng.permutation(10_000)[: len(g)]
    labels = rng.integers(0, 4, len(g))
    q = np.concatenate([base[:6], rng.standard_normal((4, 6)).astype(np.float32)])
    return g, ids, labels, q


def _worker(rank: int, init_method: str) -> None:
    import torch.distributed as dist

    with gloo_group(init_method, rank, WORLD):
        torch.set_num_threads(1)
        g, ids, labels, q = _data()
        # Unequal shards: rank 1 holds only 5 vectors, fewer than k.
        mine = np.arange(len(g)) >= 5 if rank == 0 else np.arange(len(g)) < 5
        for metric in ("cosine", "ip", "l2"):  # similarities merge largest first
            local = fs.EmbeddingIndex(6, metric=metric)
            local.add(g[mine], ids=ids[mine], labels=labels[mine])
            sharded = fs.index.ShardedEmbeddingIndex(local)
            assert len(sharded) == len(g)
            whole = fs.EmbeddingIndex(6, metric=metric)
            whole.add(g, ids=ids, labels=labels)
            for k in (1, 8, len(g)):
                got, want = sharded.search(q, k), whole.search(q, k)
                assert torch.equal(got.ids, want.ids), (rank, k, metric)
                assert torch.equal(got.distances, want.distances), (rank, k, metric)
                assert torch.equal(got.labels, want.labels), (rank, k, metric)
        # Every rank returns the same answer.
        parts = [torch.empty(len(q), 8, dtype=torch.int64) for _ in range(WORLD)]
        dist.all_gather(parts, sharded.search(q, 8).ids)
        assert torch.equal(parts[0], parts[1])
        try:
            sharded.search(q, len(g) + 1)
        except EmbeddingIndexError:
            pass
        else:
            raise AssertionError("k above the total size must fail")


def test_two_ranks_equal_one_index(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    spawn_ranks(_worker, (), WORLD, tmp_path)


def test_needs_initialised_process_group():
    with pytest.raises(EmbeddingIndexError, match="init_process_group"):
        fs.index.ShardedEmbeddingIndex(fs.EmbeddingIndex(2))


def _contract_worker(rank: int, init_method: str) -> None:
    with gloo_group(init_method, rank, WORLD):
        torch.set_num_threads(1)
        g, ids, labels, q = _data()
        mine = np.arange(len(g)) % WORLD == rank
        local = fs.EmbeddingIndex(6)
        local.add(g[mine], ids=ids[mine], labels=labels[mine])
        sharded = fs.index.ShardedEmbeddingIndex(local)
        cases = [
            # (this rank's queries, this rank's k, the message every rank must raise)
            (q, 3 + rank, r"same k on every rank \(rank 0: 3, rank 1: 4\)"),
            (q[: 4 + rank], 3, "same number of queries"),
            (q + rank, 3, "same queries on every rank"),
            (q if rank == 0 else q[:, :5], 3, r"rank\(s\) \[1\] refused their arguments"),
            (q, 3 if rank == 0 else 0, r"rank\(s\) \[1\] refused"),
        ]
        for queries, k, message in cases:
            with pytest.raises(EmbeddingIndexError, match=message):
                sharded.search(queries, k)
        # Still in step: a correct call works on both ranks after the refusals.
        whole = fs.EmbeddingIndex(6)
        whole.add(g, ids=ids, labels=labels)
        assert torch.equal(sharded.search(q, 5).ids, whole.search(q, 5).ids)
        # An id on both shards is found once a shard changes, on every rank.
        local.add(g[:1], ids=ids[~mine][:1] if rank == 0 else [123_456])
        shared = int(ids[~mine][0] if rank == 0 else ids[mine][0])
        with pytest.raises(EmbeddingIndexError, match=rf"ids \[{shared}\] are in more than one"):
            sharded.search(q, 3)


def test_ranks_that_disagree_fail_together_with_a_clear_error(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    spawn_ranks(_contract_worker, (), WORLD, tmp_path)
