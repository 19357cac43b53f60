"""Searches beside add and remove: each answer belongs to one state of the index, exactly.

A short run per storage path (rows searched as they are, rows stored in bfloat16, unit rows for
cosine); ``tests/reliability/test_concurrency_stress.py`` runs longer ones in the slow lane.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import featurescope as fs
from reliability._stress import check, run_stress


@pytest.mark.parametrize(
    ("dtype", "metric"),
    [(torch.float32, "l2"), (torch.bfloat16, "l2"), (torch.float32, "cosine")],
)
def test_every_answer_equals_brute_force_of_the_state_it_saw(dtype, metric):
    index = fs.EmbeddingIndex(12, dtype=dtype, metric=metric)
    log = run_stress(index, seconds=1.5, readers=2, writers=1, seed=7)
    assert check(log, metric) == []
    # The run must have searched many distinct states, or it proved nothing.
    assert len({version for version, *_ in log.answers}) >= 5, log.states.keys()
    assert len(log.answers) >= 20


def test_a_search_keeps_its_state_while_the_index_changes():
    index = fs.EmbeddingIndex(2)
    index.add(torch.tensor([[0.0, 0.0], [10.0, 0.0]]), ids=[1, 2], metadata=["a", "b"])
    before = index.version
    snap = index._snapshot()
    index.remove([1])
    index.add(torch.tensor([[0.5, 0.0]] * 3), ids=[3, 4, 5], metadata=["c", "d", "e"])
    # The old state is untouched by both changes: same rows, ids and metadata.
    assert snap.version == before and index.version == before + 2
    assert snap.ids.tolist() == [1, 2] and list(snap.metadata[: snap.n]) == ["a", "b"]
    assert snap.vectors.tolist() == [[0.0, 0.0], [10.0, 0.0]]
    result = index.search(torch.zeros(1, 2), k=1)
    assert result.ids.tolist() == [[3]] and result.version == index.version


def test_concurrent_adds_of_the_same_ids_let_exactly_one_in():
    index = fs.EmbeddingIndex(4)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def add() -> None:
        barrier.wait()
        try:
            index.add(np.ones((50, 4), np.float32), ids=np.arange(50))
            outcomes.append("added")
        except fs.errors.EmbeddingIndexError as exc:
            outcomes.append("refused" if "already in the index" in str(exc) else repr(exc))

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["added", "refused", "refused", "refused"]
    assert index.ids.tolist() == list(range(50))
