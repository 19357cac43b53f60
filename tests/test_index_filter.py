"""Filtered search (where=, select), k up to the gallery size, padding: against a float64 brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import featurescope as fs
from featurescope.errors import EmbeddingIndexError, InputShapeError
from featurescope.index._search._profile import time_breakdown


def brute_force(gallery, ids, queries, k, allowed=None):
    """Float64 distances over the allowed rows; (distance, id) order; pad with -1 / inf."""
    g = torch.as_tensor(gallery, dtype=torch.float32).double()
    q = torch.as_tensor(queries, dtype=torch.float32).double()
    ids = np.asarray(ids)
    allowed = np.ones(len(ids), bool) if allowed is None else np.asarray(allowed)
    dist = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1).sqrt().numpy()
    out_d = np.full((len(q), k), math.inf)
    out_i = np.full((len(q), k), -1, dtype=np.int64)
    for r, row in enumerate(dist):
        cand = np.flatnonzero(allowed)
        order = cand[np.lexsort((ids[cand], row[cand]))][:k]
        out_d[r, : len(order)] = row[order]
        out_i[r, : len(order)] = ids[order]
    return torch.tensor(out_d), torch.tensor(out_i)


def make(kind, n, d, nq, seed):
    rng = np.random.default_rng(seed)
    if kind == "duplicates":
        g = rng.standard_normal((max(1, n // 4), d))[rng.integers(0, max(1, n // 4), n)]
    elif kind == "grid":
        g = rng.integers(-2, 3, (n, d)).astype(np.float64)
    elif kind == "offset":
        g = 1000.0 + rng.standard_normal((n, d))
    else:
        g = rng.standard_normal((n, d))
    g = g.astype(np.float32)
    q = np.where(
        rng.random((nq, 1)) < 0.5, g[rng.integers(0, n, nq)], rng.standard_normal((nq, d))
    ).astype(np.float32)
    return g, q, rng.permutation(10 * n)[:n], rng


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["random", "duplicates", "grid", "offset"]),
    n=st.integers(1, 90),
    d=st.integers(1, 8),
    nq=st.integers(1, 6),
    k_frac=st.floats(0, 1),
    allowed=st.sampled_from(["none", "one", "few", "half", "all"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_where_equals_filtered_brute_force(kind, n, d, nq, k_frac, allowed, seed):
    g, q, ids, rng = make(kind, n, d, nq, seed)
    share = {"none": 0.0, "one": None, "few": 0.1, "half": 0.5, "all": 1.0}[allowed]
    if share is None:
        mask = np.zeros(n, bool)
        mask[rng.integers(0, n)] = True
    else:
        mask = rng.random(n) < share
    k = 1 + int(k_frac * (n - 1))
    index = fs.EmbeddingIndex(d)
    index.add(g, ids=ids)
    dist, found = index.search(q, k, where=torch.from_numpy(mask))
    ref_d, ref_i = brute_force(g, ids, q, k, mask)
    assert torch.equal(found, ref_i)
    assert torch.equal(dist, ref_d)


@settings(max_examples=8, deadline=None)
@given(
    kind=st.sampled_from(["random", "duplicates", "grid"]),
    share=st.sampled_from([0.01, 0.3, 0.9]),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_where_across_many_tiles(kind, share, k, seed):
    # Small tiles: the subset is gathered tile by tile, the grouped selection runs.
    g, q, ids, rng = make(kind, 2000, 6, 40, seed)
    mask = rng.random(2000) < share
    config = fs.index.SearchConfig(gallery_tile=256, merge_every=2)
    index = fs.EmbeddingIndex(6, memory_budget=1 << 16, config=config)
    index.add(g, ids=ids)
    dist, found = index.search(q, k, where=mask)
    ref_d, ref_i = brute_force(g, ids, q, k, mask)
    assert torch.equal(found, ref_i)
    assert torch.equal(dist, ref_d)


def test_where_never_scores_excluded_rows():
    # Every score block the search writes covers allowed rows only: no full distance matrix.
    g, q, ids, rng = make("random", 5000, 16, 8, 3)  # 8 queries: one query tile
    mask = rng.random(5000) < 0.01
    index = fs.EmbeddingIndex(16)
    index.add(g, ids=ids)
    with time_breakdown() as seen:
        _, found = index.search(q, 5, where=mask)
    assert seen["rows scored"] == mask.sum()
    assert torch.equal(found, brute_force(g, ids, q, 5, mask)[1])


def test_where_with_exclude_ids_and_padding():
    g, q, ids, _rng = make("duplicates", 50, 3, 4, 7)
    index = fs.EmbeddingIndex(3)
    index.add(g, ids=ids, labels=np.arange(50) % 5, metadata=[f"{i}.png" for i in range(50)])
    mask = index.select(labels=[2])
    excl = torch.as_tensor(ids[[2, 7, 12, 17]])[None].expand(4, 4)
    result = index.search(q, 12, where=mask, exclude_ids=excl)
    allowed = mask.numpy().copy()
    allowed[[2, 7, 12, 17]] = False
    ref_d, ref_i = brute_force(g, ids, q, 12, allowed)
    assert torch.equal(result.ids, ref_i) and torch.equal(result.distances, ref_d)
    assert (result.ids[:, 6:] == -1).all() and (result.labels[:, 6:] == -1).all()
    assert (result.labels[:, :6] == 2).all()
    assert all(m is None for row in result.metadata for m in row[6:])


def test_select_by_ids_and_labels():
    index = fs.EmbeddingIndex(2)
    index.add(torch.randn(6, 2), ids=[9, 3, 5, 7, 1, 2], labels=[0, 1, 0, 1, 2, 2])
    assert index.select(ids=[3, 1]).tolist() == [False, True, False, False, True, False]
    assert index.select(labels=[0, 2]).tolist() == [True, False, True, False, True, True]
    both = index.select(ids=np.array([9, 3]), labels=torch.tensor([1]))
    assert both.tolist() == [False, True, False, False, False, False]
    assert index.select().all()
    with pytest.raises(EmbeddingIndexError, match=r"ids \[4\] are not in the index"):
        index.select(ids=[4, 9])
    with pytest.raises(EmbeddingIndexError, match="integers"):
        index.select(labels=[0.5])


def test_where_errors_leave_index_usable():
    index = fs.EmbeddingIndex(2)
    index.add(torch.randn(5, 2))
    with pytest.raises(EmbeddingIndexError, match="boolean mask"):
        index.search(torch.zeros(1, 2), 2, where=[0, 1])
    with pytest.raises(InputShapeError, match="one entry per indexed vector"):
        index.search(torch.zeros(1, 2), 2, where=torch.ones(4, dtype=torch.bool))
    assert index.search(torch.zeros(1, 2), 2).ids.shape == (1, 2)


@pytest.mark.parametrize("kind", ["random", "duplicates", "grid"])
def test_k_equals_gallery_size(kind):
    g, q, ids, _ = make(kind, 3000, 5, 7, 1)
    index = fs.EmbeddingIndex(5, memory_budget=1 << 20)
    index.add(g, ids=ids)
    dist, found = index.search(q, 3000)
    ref_d, ref_i = brute_force(g, ids, q, 3000)
    assert torch.equal(found, ref_i)
    assert torch.equal(dist, ref_d)


def test_large_k_temporaries_stay_in_budget():
    # The exhaustive path holds one query tile's distances: bq * n cells within the budget.
    g, q, ids, _ = make("random", 4000, 4, 50, 2)
    budget = 1 << 20
    index = fs.EmbeddingIndex(4, memory_budget=budget)
    index.add(g, ids=ids)
    with time_breakdown() as seen:
        result = index.search(q, 3000)
    found = result.ids
    assert result.backend == "float64"
    rows = seen["exhaustive query rows"]
    assert rows > 0 and rows * 4000 * 40 <= budget
    assert torch.equal(found, brute_force(g, ids, q, 3000)[1])


@settings(max_examples=10, deadline=None)
@given(
    kind=st.sampled_from(["random", "duplicates", "grid", "offset", "approaching"]),
    k=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_threshold_selection_across_tiles(kind, k, seed):
    # Tiles wide enough for the grouped, threshold-based selection; "approaching" orders the
    # gallery from far to near the queries, so every tile brings better candidates.
    g, q, ids, rng = make("random" if kind == "approaching" else kind, 12000, 4, 20, seed)
    if kind == "approaching":
        q = np.repeat(q[:1], 20, 0) + 1e-3 * rng.standard_normal((20, 4)).astype(np.float32)
        g = g[np.argsort(-((g - q[0]) ** 2).sum(1))]
    config = fs.index.SearchConfig(gallery_tile=1024, block_cells=20 * 1024)
    index = fs.EmbeddingIndex(4, memory_budget=1 << 20, config=config)
    index.add(g, ids=ids)
    dist, found = index.search(q, k)
    ref_d, ref_i = brute_force(g, ids, q, k)
    assert torch.equal(found, ref_i)
    assert torch.equal(dist, ref_d)
