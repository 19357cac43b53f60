"""The bfloat16 product backend: exact results and a rounding bound that holds pair by pair."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import featurescope as fs
from featurescope.index._search import _backends, _metric
from test_index import KINDS, brute_force, make_data

#: bfloat16 for every search; BF16_AUTO: where it pays (enough queries, rows, or a copy).
BF16 = fs.index.SearchConfig(
    backend="bfloat16", min_queries_low_precision=1, min_rows_low_precision=1
)
BF16_AUTO = fs.index.SearchConfig(backend="bfloat16")


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(2, 400),
    d=st.integers(1, 40),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_bf16_search_equals_float64_brute_force(kind, n, d, k, seed, dtype):
    g, q, ids = make_data(kind, n, d, 15, seed)
    if dtype == torch.float16 and kind == "mixed":
        dtype = torch.bfloat16
    k = min(k, n)
    # Small tiles: many of them, the grouped selection, merges.
    config = dataclasses.replace(BF16, gallery_tile=64)
    index = fs.EmbeddingIndex(d, dtype=dtype, memory_budget=1 << 16, config=config)
    index.add(g, ids=ids)
    dist, found = index.search(q, k)
    where = torch.from_numpy(np.random.default_rng(seed).random(n) < 0.3)
    fdist, ffound = index.search(q, k, where=where)
    ref_d, ref_i = brute_force(g, ids, q, k)
    assert torch.equal(found, ref_i)
    assert torch.equal(dist, ref_d)
    keep = where.numpy()
    if keep.any():
        m = min(k, int(keep.sum()))
        ref_d, ref_i = brute_force(g[keep], ids[keep], q, m)
        assert torch.equal(ffound[:, :m], ref_i)
        assert torch.equal(fdist[:, :m], ref_d)
    assert (ffound[:, min(k, int(keep.sum())) :] == -1).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_bf16_scores_stay_within_their_bound_pair_by_pair(kind, storage):
    # The certificate of the fast pass: no vector's (lowered) score exceeds the threshold its
    # exact distance allows, so no true neighbour can fall outside a query's candidates.
    g, q, _ = make_data(kind, 3000, 48, 64, 1)
    index = fs.EmbeddingIndex(48, dtype=storage)
    index.add(g)
    gal = index._gallery()
    rel, absolute = _metric.error_coefficients(48, torch.device("cpu"))
    qs = gal.metric.prepare(torch.from_numpy(q), gal, rel, absolute, low=True)
    assert qs.product.dtype == torch.bfloat16
    tile, norms = gal.tile(0, gal.size, None, torch.bfloat16)
    scores = torch.empty(q.shape[0], gal.size)
    _backends.BACKENDS["bfloat16"].scores_into(qs.product, tile, norms, scores)
    exact = torch.cdist(torch.from_numpy(q).double(), torch.from_numpy(g).double())
    d = 48
    reach = exact * (1 + 4 * (d + 2) * 2.0**-53) + qs.slack[:, None]
    theta = reach * reach - qs.constant[:, None] + qs.error[:, None]
    theta = theta + 1e-12 * (reach * reach + qs.constant.abs()[:, None] + qs.error[:, None])
    assert (scores.double() <= theta).all()
    # ...and the bound is not vacuous: it is a small share of the scores' spread.
    spread = (scores.double().amax(1) - scores.double().amin(1)).median()
    assert float(qs.error.median()) < 0.2 * float(spread)


def test_bf16_copy_is_made_once_and_shared_with_filtered_views():
    g, q, _ = make_data("random", 2000, 32, 50, 2)
    index = fs.EmbeddingIndex(32, config=BF16)
    index.add(g)
    index.search(q, 5)
    gal = index._gallery()
    copy = gal.low.value
    assert copy is not None and copy.dtype == torch.bfloat16 and copy.shape == (2000, 32)
    index.search(q, 5, where=index.ids % 2 == 0)
    assert index._gallery().low.value is copy
    assert 0 < gal.low.error <= 2.0**-8 * gal.centred_radius
    index.add(g[:10])  # a change makes a new snapshot, and a new copy when next needed
    assert index._gallery().low.value is None


def test_mapped_gallery_converts_tiles_instead_of_keeping_a_copy(tmp_path):
    g, q, ids = make_data("offset", 3000, 16, 40, 3)
    index = fs.EmbeddingIndex(16)
    index.add(g, ids=ids)
    mapped = fs.EmbeddingIndex.load(index.save(tmp_path / "g.safetensors"), mmap=True, config=BF16)
    result = mapped.search(q, 7)
    assert result.backend == "bfloat16"
    dist, found = result
    ref_d, ref_i = brute_force(g, ids, q, 7)
    assert torch.equal(found, ref_i) and torch.equal(dist, ref_d)
    assert mapped._gallery().low.value is None


@pytest.mark.parametrize(
    ("speedup", "expected"),
    [(1.0, "float32"), (1.2, "float32"), (1.3, "bfloat16"), (3.0, "bfloat16")],
)
def test_bf16_is_chosen_only_when_clearly_faster(speedup, expected):
    fake = {"float32": 1.0, "numpy": 1.1, "bfloat16": 1.0 / speedup}
    timed: list[str] = []

    def timer(fns):
        timed.extend(fns)
        return {b: fake[b] for b in fns}

    q = torch.randn(300, 8)
    tile = torch.randn(64, 8)

    def sample():
        return tile, torch.zeros(64)

    chosen: dict[int, str] = {}
    config = fs.index.SearchConfig()
    got = _backends.choose_backend(q, sample, 300, 10**9, config, timer=timer, chosen=chosen)
    assert got.name == expected and chosen == {8: expected}
    raced = len(timed)
    # numpy's sgemm only where it runs single-threaded on a worker: through OpenBLAS's batch of
    # one, or where the process holds its BLAS at one thread (never set by us).
    import threadpoolctl

    from featurescope.index._search._openblas import openblas_sgemm

    single = openblas_sgemm() is not None or all(
        i["num_threads"] == 1
        for i in threadpoolctl.threadpool_info()
        if i["user_api"] == "blas" and "numpy" in i["filepath"]
    )
    assert sorted(timed) == (
        ["bfloat16", "float32", "numpy"] if single else ["bfloat16", "float32"]
    )
    # Remembered: no second race; a search that may not use bfloat16 gets float32.
    again = _backends.choose_backend(
        q, sample, 300, 10**9, config, False, timer=timer, chosen=chosen
    )
    assert again.name == "float32" and len(timed) == raced


def test_named_backend_is_used_without_timing():
    called = []
    for name in ("float32", "bfloat16", "numpy"):
        config = fs.index.SearchConfig(backend=name)
        got = _backends.choose_backend(torch.randn(3, 4), lambda: called.append(1), 3, 10, config)
        assert got.name == name
    assert not called


def test_small_searches_are_not_raced():
    called = []
    got = _backends.choose_backend(
        torch.randn(3, 4), lambda: called.append(1), 3, 10, fs.index.SearchConfig(), chosen={}
    )
    assert got.name == "float32" and not called


def test_bf16_error_has_no_infinite_or_nan_terms_for_extreme_scales():
    g = np.float32([[1e-30] * 4, [3e12, -3e12, 1.0, 0.0], [0.0] * 4])
    index = fs.EmbeddingIndex(4, config=BF16)
    index.add(g)
    dist, found = index.search(g, 3)
    ref_d, ref_i = brute_force(g, np.arange(3), g, 3)
    assert torch.equal(found, ref_i) and torch.equal(dist, ref_d)
    assert math.isfinite(float(dist[0, 0]))


def test_few_queries_do_not_make_the_copy_but_use_one_that_exists():
    # Making the bfloat16 copy costs more than a few queries' product saves: a small search
    # stays in float32 until a large one has made the copy.
    g, q, ids = make_data("random", 3000, 16, 300, 6)
    index = fs.EmbeddingIndex(16, config=BF16_AUTO)
    index.add(g, ids=ids)
    small = index.search(q[:8], 4)
    assert small.backend == "float32" and index._gallery().low.value is None
    large = index.search(q, 4)
    assert large.backend == "bfloat16" and index._gallery().low.value is not None
    again = index.search(q[:8], 4)
    assert again.backend == "bfloat16"
    ref_d, ref_i = brute_force(g, ids, q, 4)
    assert torch.equal(large.ids, ref_i) and torch.equal(large.distances, ref_d)
    assert torch.equal(small.ids, ref_i[:8]) and torch.equal(again.ids, ref_i[:8])


def test_a_narrow_filter_searches_in_float32():
    g, q, ids = make_data("random", 6000, 16, 300, 7)
    index = fs.EmbeddingIndex(16, config=BF16_AUTO)
    index.add(g, ids=ids)
    assert index.search(q, 4).backend == "bfloat16"  # makes the bfloat16 copy
    narrow = torch.zeros(6000, dtype=torch.bool)
    narrow[::10] = True  # 600 rows
    found = index.search(q, 4, where=narrow)
    assert found.backend == "float32"
    ref_d, ref_i = brute_force(g[::10], ids[::10], q, 4)
    assert torch.equal(found.ids, ref_i) and torch.equal(found.distances, ref_d)
    assert index.search(q, 4, where=~narrow).backend == "bfloat16"  # 5400 rows: the copy


def test_other_metrics_multiply_in_float32():
    g, q, _ = make_data("random", 3000, 16, 300, 8)
    for metric in ("cosine", "ip"):
        index = fs.EmbeddingIndex(16, metric=metric, config=BF16)
        index.add(g)
        assert index.search(q, 4).backend == "float32"
