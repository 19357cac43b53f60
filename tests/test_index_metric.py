"""Cosine and inner-product search: equal to a float64 brute force on hard sets, everywhere the
L2 search is (filters, exclusions, tiles, workers, half storage, memory maps, files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import featurescope as fs
from featurescope.errors import EmbeddingIndexError

KINDS = ["random", "duplicates", "near", "offset", "mixed", "grid", "zeros", "parallel"]


def similarities(metric: str, gallery, queries) -> np.ndarray:
    """Float64 inner products or cosines of the float32 values, written out (0 for zero rows)."""
    g = torch.as_tensor(np.asarray(gallery, dtype=np.float32)).double()
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32)).double()
    dots = (q[:, None, :] * g[None, :, :]).sum(-1)
    if metric == "ip":
        return dots.numpy()
    qn = (q * q).sum(-1).sqrt()
    gn = (g * g).sum(-1).sqrt()
    scale = qn[:, None] * gn[None, :]
    return torch.where(scale > 0, dots / torch.where(scale > 0, scale, 1.0), 0.0).numpy()


def brute_force(metric, gallery, ids, queries, k, allowed=None):
    """Largest similarity first, ties to the smaller id; ``-inf``/``-1`` padding."""
    sim = similarities(metric, gallery, queries)
    ids = np.asarray(ids)
    out_s = np.full((len(sim), k), -np.inf)
    out_i = np.full((len(sim), k), -1, dtype=np.int64)
    for r, row in enumerate(sim):
        cols = np.arange(len(ids)) if allowed is None else np.flatnonzero(allowed[r])
        order = cols[np.lexsort((ids[cols], -row[cols]))][:k]
        out_s[r, : len(order)] = row[order]
        out_i[r, : len(order)] = ids[order]
    return torch.from_numpy(out_s), torch.from_numpy(out_i)


def make_data(kind: str, n: int, d: int, nq: int, seed: int):
    rng = np.random.default_rng(seed)
    m = max(1, n // 4)
    if kind == "random":
        g = rng.standard_normal((n, d))
    elif kind == "duplicates":
        g = rng.standard_normal((m, d))[rng.integers(0, m, n)]
    elif kind == "near":
        g = rng.standard_normal((m, d))[rng.integers(0, m, n)] + 1e-4 * rng.standard_normal((n, d))
    elif kind == "offset":  # every vector nearly the same direction: cosines within 1e-6
        g = 1000.0 + rng.standard_normal((n, d))
    elif kind == "mixed":  # norms over six orders of magnitude
        g = rng.standard_normal((n, d)) * 10.0 ** rng.uniform(-3, 3, (n, 1))
    elif kind == "grid":  # small integers: many exact ties
        g = rng.integers(-2, 3, (n, d)).astype(np.float64)
    elif kind == "zeros":
        g = rng.standard_normal((n, d)) * (rng.random((n, 1)) < 0.5)
    elif kind == "parallel":  # one direction, many lengths: equal cosines, ordered inner products
        g = rng.standard_normal((1, d)) * rng.integers(1, 5, (n, 1))
    else:
        raise AssertionError(kind)
    g = g.astype(np.float32)
    pick = g[rng.integers(0, n, nq)]
    fresh = (g.mean(0) + g.std(0) * rng.standard_normal((nq, d))).astype(np.float32)
    q = np.where(rng.random((nq, 1)) < 0.5, pick, fresh).astype(np.float32)
    if kind == "zeros":
        q[0] = 0.0
    ids = rng.permutation(10 * n)[:n]
    return g, q, ids


@settings(max_examples=60, deadline=None)
@given(
    metric=st.sampled_from(["cosine", "ip"]),
    kind=st.sampled_from(KINDS),
    n=st.integers(1, 80),
    d=st.integers(1, 12),
    nq=st.integers(1, 9),
    k_frac=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_search_equals_float64_brute_force(metric, kind, n, d, nq, k_frac, seed, dtype):
    g, q, ids = make_data(kind, n, d, nq, seed)
    if dtype == torch.float16 and kind in ("mixed", "offset"):
        dtype = torch.bfloat16  # beyond float16's range; the index refuses those rows
    k = 1 + int(k_frac * (n - 1))
    index = fs.EmbeddingIndex(d, dtype=dtype, metric=metric)
    index.add(g, ids=ids)
    sims, found = index.search(q, k)
    ref_s, ref_i = brute_force(metric, g, ids, q, k)
    assert torch.equal(found, ref_i)
    assert torch.equal(sims, ref_s)


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("kind", ["duplicates", "near", "offset", "zeros"])
def test_many_tiles_workers_and_near_ties(metric, kind):
    # A small budget makes many tiles; 64 queries go to workers; near-ties overflow the
    # candidate lists and send queries to the second pass.
    g, q, ids = make_data(kind, 6000, 6, 64, 3)
    index = fs.EmbeddingIndex(6, metric=metric, memory_budget=1 << 20)
    index.add(g, ids=ids)
    for k in (1, 10):
        sims, found = index.search(q, k)
        ref_s, ref_i = brute_force(metric, g, ids, q, k)
        assert torch.equal(found, ref_i) and torch.equal(sims, ref_s)
    few = index.search(q[:3], 5)  # few queries: workers split the gallery
    ref_s, ref_i = brute_force(metric, g, ids, q[:3], 5)
    assert torch.equal(few.ids, ref_i) and torch.equal(few.distances, ref_s)


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_filters_exclusions_and_large_k(metric):
    g, q, ids = make_data("duplicates", 300, 5, 7, 1)
    index = fs.EmbeddingIndex(5, metric=metric)
    labels = np.arange(300) % 3
    index.add(g, ids=ids, labels=labels)
    where = index.labels == 1
    got = index.search(q, 120, where=where)  # more than the 100 allowed: padded
    allowed = np.broadcast_to(labels == 1, (7, 300))
    ref_s, ref_i = brute_force(metric, g, ids, q, 120, allowed)
    assert torch.equal(got.ids, ref_i) and torch.equal(got.distances, ref_s)
    assert got.distances[:, -1].tolist() == [-np.inf] * 7
    own = ids[:7]
    got = index.search(g[:7], 4, exclude_ids=own)
    allowed = ids[None, :] != own[:, None]
    ref_s, ref_i = brute_force(metric, g, ids, g[:7], 4, allowed)
    assert torch.equal(got.ids, ref_i) and torch.equal(got.distances, ref_s)
    got = index.search(q, 299)  # k near the gallery size: every key computed in float64
    ref_s, ref_i = brute_force(metric, g, ids, q, 299)
    assert torch.equal(got.ids, ref_i) and torch.equal(got.distances, ref_s)


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_memory_mapped_and_reloaded_indexes_equal_in_memory(metric, tmp_path):
    g, q, ids = make_data("mixed", 3000, 7, 20, 5)
    g[::7] = 0.0
    index = fs.EmbeddingIndex(7, metric=metric, memory_budget=1 << 20)
    index.add(g, ids=ids)
    path = index.save(tmp_path / "i.safetensors")
    want = index.search(q, 6)
    ref_s, ref_i = brute_force(metric, g, ids, q, 6)
    assert torch.equal(want.ids, ref_i) and torch.equal(want.distances, ref_s)
    for mmap in (False, True):
        again = fs.EmbeddingIndex.load(path, mmap=mmap)
        assert again.metric == metric
        got = again.search(q, 6)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.distances, want.distances)


def test_files_without_a_metric_load_as_l2(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    index = fs.EmbeddingIndex(3)
    index.add(torch.randn(10, 3))
    path = index.save(tmp_path / "i.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    config = json.loads(header["config"])
    assert config.pop("metric") == "l2"
    header["config"] = json.dumps(config)
    save_file(tensors, str(path), metadata=header)
    assert fs.EmbeddingIndex.load(path).metric == "l2"
    assert fs.EmbeddingIndex.load(path, mmap=True).metric == "l2"


def test_from_features_takes_a_metric(tmp_path):
    g, q, ids = make_data("near", 400, 4, 5, 2)
    np.save(tmp_path / "fc.npy", g)
    manifest = {
        "format": "featurescope.features",
        "nodes": {"fc": {"file": "fc.npy"}},
        "completed": 400,
        "sample_ids": ids.tolist(),
        "labels": None,
        "paths": None,
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    ref_s, ref_i = brute_force("cosine", g, ids, q, 3)
    for mmap in (True, False):
        index = fs.EmbeddingIndex.from_features(tmp_path, mmap=mmap, metric="cosine")
        got = index.search(q, 3)
        assert torch.equal(got.ids, ref_i) and torch.equal(got.distances, ref_s)


def test_unknown_metric_is_refused():
    with pytest.raises(EmbeddingIndexError, match="metric must be one of"):
        fs.EmbeddingIndex(3, metric="euclid")
    assert "metric='ip'" in repr(fs.EmbeddingIndex(3, metric="ip"))
