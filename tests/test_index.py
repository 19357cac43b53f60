"""EmbeddingIndex: exact search against a float64 brute force, API, errors, memory plan."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import featurescope as fs
from featurescope.errors import EmbeddingIndexError, InputShapeError
from featurescope.index._search import _schedule
from featurescope.index._search._plan import TilePlan, plan_tiles
from featurescope.index._search._profile import time_breakdown


def brute_force(gallery, ids, queries, k):
    """Float64 distances to every vector; per row, order by (distance, id) with numpy lexsort."""
    g = torch.as_tensor(gallery, dtype=torch.float32).double()
    q = torch.as_tensor(queries, dtype=torch.float32).double()
    dist = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1).sqrt().numpy()
    ids = np.asarray(ids)
    out_d, out_i = [], []
    for row in dist:
        order = np.lexsort((ids, row))[:k]
        out_d.append(row[order])
        out_i.append(ids[order])
    return torch.tensor(np.array(out_d)), torch.tensor(np.array(out_i))


def make_data(kind: str, n: int, d: int, nq: int, seed: int):
    rng = np.random.default_rng(seed)
    if kind == "random":
        g = rng.standard_normal((n, d))
    elif kind == "duplicates":
        g = rng.standard_normal((max(1, n // 4), d))[rng.integers(0, max(1, n // 4), n)]
    elif kind == "near":
        base = rng.standard_normal((max(1, n // 4), d))[rng.integers(0, max(1, n // 4), n)]
        g = base + 1e-3 * rng.standard_normal((n, d))
    elif kind == "offset":
        g = 1000.0 + rng.standard_normal((n, d))
    elif kind == "mixed":
        g = rng.standard_normal((n, d)) * 10.0 ** rng.uniform(-3, 3, (n, 1))
    elif kind == "grid":  # small integers: many exact ties in distance
        g = rng.integers(-2, 3, (n, d)).astype(np.float64)
    else:
        raise AssertionError(kind)
    g = g.astype(np.float32)
    # Queries: some gallery rows (distance 0, ties among duplicates), some perturbed, some fresh.
    pick = g[rng.integers(0, n, nq)]
    fresh = (g.mean(0) + g.std(0) * rng.standard_normal((nq, d))).astype(np.float32)
    q = np.where(rng.random((nq, 1)) < 0.5, pick, fresh).astype(np.float32)
    ids = rng.permutation(10 * n)[:n]
    return g, q, ids


KINDS = ["random", "duplicates", "near", "offset", "mixed", "grid"]


@settings(max_examples=40)
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(1, 80),
    d=st.integers(1, 12),
    nq=st.integers(1, 9),
    k_frac=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_search_equals_float64_brute_force(kind, n, d, nq, k_frac, seed, dtype):
    g, q, ids = make_data(kind, n, d, nq, seed)
    if dtype == torch.float16 and kind == "mixed":
        dtype = torch.bfloat16  # float16 cannot hold 1e3 * N(0,1) spread well; covered below
    k = 1 + int(k_frac * (n - 1))
    index = fs.EmbeddingIndex(d, dtype=dtype)
    index.add(g, ids=ids)
    dist, found = index.search(q, k)
    ref_d, ref_i = brute_force(g, ids, q, k)
    assert torch.equal(found, ref_i)
    assert torch.equal(dist, ref_d)


@settings(max_examples=12)
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(300, 1500),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_search_exact_across_many_tiles(kind, n, k, seed):
    # Small tiles force many gallery tiles, the grouped selection and the periodic merges.
    g, q, ids = make_data(kind, n, 6, 20, seed)
    config = fs.index.SearchConfig(gallery_tile=256, merge_every=2)
    index = fs.EmbeddingIndex(6, memory_budget=1 << 16, config=config)
    index.add(g, ids=ids)
    dist, found = index.search(q, k)
    ref_d, ref_i = brute_force(g, ids, q, k)
    assert torch.equal(found, ref_i)
    assert torch.equal(dist, ref_d)


def test_all_duplicates_exceed_candidate_list():
    # 500 copies of one vector: every one ties; the smallest ids must win.
    g = np.tile(np.float32([[1000.5, -3.25, 7.0]]), (500, 1))
    ids = np.random.default_rng(0).permutation(500)
    index = fs.EmbeddingIndex(3)
    index.add(g, ids=ids)
    dist, found = index.search(g[:2], 5)
    assert found.tolist() == [[0, 1, 2, 3, 4]] * 2
    assert (dist == 0).all()


def test_near_duplicates_far_from_origin_ordered():
    # Distances of 1e-3 next to coordinates of 1e3: float32 expansion cannot see them.
    base = np.full((1, 16), 1000.0, dtype=np.float32)
    steps = np.float32(np.arange(1, 11) * 1e-3)
    g = np.repeat(base, 10, 0)
    g[:, 0] += steps[::-1]
    index = fs.EmbeddingIndex(16)
    index.add(g)
    _, found = index.search(base, 10)
    assert found.tolist() == [list(range(9, -1, -1))]


def test_faiss_flat_index_is_not_exact_where_embedding_index_is():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    # 1. A shell: 200 vectors at distance 0.5 from the query, differing in float64 only in
    #    their last float32 bits. FAISS's float32 accumulation cannot order them.
    d, nb = 256, 200
    q = rng.standard_normal((1, d)).astype(np.float32)
    u = rng.standard_normal((nb, d))
    g = (q + 0.5 * u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float32)
    ref_d, ref_i = brute_force(g, np.arange(nb), q, 10)
    flat = faiss.IndexFlatL2(d)
    flat.add(g)
    _, f_i = flat.search(q, 10)
    assert not np.array_equal(f_i, ref_i.numpy())
    index = fs.EmbeddingIndex(d)
    index.add(g)
    dist, found = index.search(q, 10)
    assert torch.equal(found, ref_i)
    assert torch.equal(dist, ref_d)

    # 2. Data far from the origin on FAISS's BLAS path (‖x‖²+‖y‖²−2⟨x,y⟩ in float32, taken for
    #    large query batches): distances of 1e-3 next to 1e3 coordinates collapse to 0.
    base = np.float32(1000.0) + rng.standard_normal(32).astype(np.float32)
    g2 = base[None] + (rng.standard_normal((1000, 32)) * 1e-3).astype(np.float32)
    q2 = base[None] + (rng.standard_normal((4, 32)) * 1e-3).astype(np.float32)
    ref_d2, ref_i2 = brute_force(g2, np.arange(1000), q2, 5)
    threshold = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 1
    try:
        flat2 = faiss.IndexFlatL2(32)
        flat2.add(g2)
        f_d2, f_i2 = flat2.search(q2, 5)
    finally:
        faiss.cvar.distance_compute_blas_threshold = threshold
    assert not np.allclose(np.sqrt(np.maximum(f_d2, 0)), ref_d2.numpy(), rtol=0.1)
    assert not np.array_equal(f_i2, ref_i2.numpy())
    index2 = fs.EmbeddingIndex(32)
    index2.add(g2)
    dist2, found2 = index2.search(q2, 5)
    assert torch.equal(found2, ref_i2)
    assert torch.equal(dist2, ref_d2)


def test_result_unpacks_and_looks_up_labels_and_metadata():
    index = fs.EmbeddingIndex(2)
    index.add(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), labels=[3, 4], metadata=["a.png", "b.png"])
    index.add(torch.tensor([[5.0, 5.0]]), ids=[10])
    result = index.search(np.array([[0.9, 0.0], [5.0, 4.0]]), 2)
    distances, ids = result
    assert ids.tolist() == [[1, 0], [10, 1]]
    assert result.labels.tolist() == [[4, 3], [-1, 4]]
    assert result.metadata == [["b.png", "a.png"], [None, "b.png"]]
    assert distances.dtype == torch.float64
    assert torch.allclose(distances[0], torch.tensor([0.1, 0.9], dtype=torch.float64))


def test_result_indexes_like_a_named_tuple():
    index = fs.EmbeddingIndex(2)
    index.add(torch.tensor([[0.0, 0.0], [1.0, 0.0], [4.0, 0.0]]), labels=[3, 4, 5])
    result = index.search(np.array([[0.9, 0.0]]), 2)
    assert len(result) == 2
    assert result[0] is result.distances and result[1] is result.ids
    assert result[-1] is result.ids and result[:] == (result.distances, result.ids)
    assert tuple(result) == (result.distances, result.ids)
    with pytest.raises(IndexError):
        result[2]
    assert result.labels.tolist() == [[4, 3]]


def test_ids_assigned_in_order_after_explicit_ids():
    index = fs.EmbeddingIndex(1)
    index.add(torch.zeros(2, 1))
    index.add(torch.ones(1, 1), ids=[7])
    index.add(torch.ones(2, 1))
    assert index.ids.tolist() == [0, 1, 7, 8, 9]


def test_remove_then_search_matches_fresh_index():
    g, q, ids = make_data("duplicates", 200, 5, 10, 3)
    index = fs.EmbeddingIndex(5)
    index.add(g, ids=ids)
    gone = ids[::3]
    assert index.remove(gone) == len(gone)
    keep = ~np.isin(ids, gone)
    assert len(index) == keep.sum()
    _, found = index.search(q, 7)
    _, ref_i = brute_force(g[keep], ids[keep], q, 7)
    assert torch.equal(found, ref_i)
    with pytest.raises(EmbeddingIndexError, match="not in the index"):
        index.remove([int(gone[0])])


def test_incremental_adds_recentre_and_stay_exact():
    # Batches drifting away from the first batch's centre: re-centring must keep exactness.
    rng = np.random.default_rng(5)
    index = fs.EmbeddingIndex(4, dtype=torch.float16)
    parts = []
    for shift in [0.0, 10.0, 100.0, 300.0, 600.0]:
        part = (shift + rng.standard_normal((30, 4))).astype(np.float32)
        index.add(part)
        parts.append(part)
    g = np.concatenate(parts)
    q = g[::7] + np.float32(0.01)
    dist, found = index.search(q, 4)
    ref_d, ref_i = brute_force(g, np.arange(len(g)), q, 4)
    assert torch.equal(found, ref_i)
    assert torch.equal(dist, ref_d)


def test_exclude_ids_leaves_out_own_entry():
    g, _, ids = make_data("duplicates", 60, 3, 1, 2)
    index = fs.EmbeddingIndex(3)
    index.add(g, ids=ids)
    _, found = index.search(g, 4, exclude_ids=ids)
    for row, own in zip(found.tolist(), ids, strict=True):
        assert own not in row
    # Against the brute force over "everything but me".
    for i in [0, 17, 59]:
        mask = ids != ids[i]
        _, ref_i = brute_force(g[mask], ids[mask], g[i : i + 1], 4)
        assert found[i].tolist() == ref_i[0].tolist()


def test_exclude_ids_pad_when_too_few_remain():
    # As FAISS pads: id -1 at distance +inf, label -1, metadata None.
    index = fs.EmbeddingIndex(1)
    index.add(torch.zeros(2, 1), labels=[3, 4], metadata=["a", "b"])
    result = index.search(torch.zeros(1, 1), 2, exclude_ids=[[0]])
    assert result.ids.tolist() == [[1, -1]]
    assert result.distances.tolist() == [[0.0, float("inf")]]
    assert result.labels.tolist() == [[4, -1]]
    assert result.metadata == [["b", None]]


def test_small_budget_same_answers_as_large_budget():
    g, q, ids = make_data("near", 3000, 24, 300, 11)
    small = fs.EmbeddingIndex(24, memory_budget=1 << 17)
    large = fs.EmbeddingIndex(24)
    for index in (small, large):
        index.add(g, ids=ids)
    a, b = small.search(q, 9), large.search(q, 9)
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.distances, b.distances)


@settings(max_examples=60)
@given(
    nq=st.integers(1, 10**6),
    nb=st.integers(1, 10**7),
    dim=st.integers(1, 4096),
    keep=st.integers(1, 64),
    budget=st.integers(2**20, 2**31),
    upcast=st.booleans(),
)
def test_tile_plan_respects_budget(nq, nb, dim, keep, budget, upcast):
    try:
        plan = plan_tiles(nq, nb, dim, keep, budget, upcast=upcast)
    except ValueError:
        assert TilePlan(1, min(nb, keep), keep, dim, upcast).scan_bytes() > budget
        return
    assert plan.scan_bytes() <= budget
    assert 1 <= plan.query_tile <= nq
    assert 1 <= plan.gallery_tile <= nb


def test_two_thousand_queries_over_200k_never_plan_the_full_matrix():
    plan = plan_tiles(2000, 200_000, 256, 20, 256 * 2**20)
    full = 2000 * 200_000 * 4
    assert plan.scan_bytes() <= 256 * 2**20 < full
    assert plan.query_tile * plan.gallery_tile * 4 <= 256 * 2**20


def test_search_blocks_stay_in_budget():
    # The largest score block the search writes may not exceed the budget.
    g, q, _ = make_data("random", 5000, 32, 400, 0)
    budget = 1 << 18
    index = fs.EmbeddingIndex(32, memory_budget=budget)
    index.add(g)
    with time_breakdown() as seen:
        index.search(q, 5)
    assert 0 < seen["score block bytes"] <= budget
    assert seen["rows scored"] >= 5000


@pytest.mark.parametrize("backend", ["float32", "numpy", "bfloat16"])
def test_every_cpu_product_backend_is_exact(backend):
    g, q, ids = make_data("offset", 3000, 16, 100, 8)
    # Every search in the named backend, however small (see SearchConfig.backend).
    config = fs.index.SearchConfig(backend=backend, min_queries_low_precision=1)
    index = fs.EmbeddingIndex(16, config=config)
    index.add(g, ids=ids)
    result = index.search(q, 6)
    assert result.backend == backend
    dist, found = result
    ref_d, ref_i = brute_force(g, ids, q, 6)
    assert torch.equal(found, ref_i) and torch.equal(dist, ref_d)


def test_input_validation_leaves_index_unchanged():
    index = fs.EmbeddingIndex(3)
    index.add(torch.zeros(2, 3), labels=[0, 1], metadata=["x", "y"])
    before = (index.vectors, index.ids, index.labels, index.metadata)
    bad = torch.ones(4, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(EmbeddingIndexError, match="row 2 contains NaN"):
        index.add(bad)
    bad[2, 1] = float("inf")
    with pytest.raises(EmbeddingIndexError, match="row 2 contains infinity"):
        index.add(bad)
    with pytest.raises(InputShapeError, match="dimension 4"):
        index.add(torch.ones(2, 4))
    with pytest.raises(InputShapeError, match="2-D"):
        index.add(torch.ones(3))
    with pytest.raises(EmbeddingIndexError, match="duplicates"):
        index.add(torch.ones(2, 3), ids=[5, 5])
    with pytest.raises(EmbeddingIndexError, match="already in the index"):
        index.add(torch.ones(2, 3), ids=[1, 9])
    with pytest.raises(EmbeddingIndexError, match="labels must be >= 0"):
        index.add(torch.ones(2, 3), labels=[0, -4])
    with pytest.raises(InputShapeError, match="metadata has 1 entries"):
        index.add(torch.ones(2, 3), metadata=["only one"])
    with pytest.raises(EmbeddingIndexError, match="above the supported"):
        index.add(torch.full((1, 3), 1e20))
    after = (index.vectors, index.ids, index.labels, index.metadata)
    assert all(torch.equal(a, b) for a, b in zip(before[:3], after[:3], strict=True))
    assert before[3] == after[3]


def test_float16_overflow_rejected_before_change():
    index = fs.EmbeddingIndex(2, dtype=torch.float16)
    index.add(torch.zeros(4, 2))
    with pytest.raises(EmbeddingIndexError, match="float16"):
        index.add(torch.tensor([[1e6, 0.0]]))
    assert len(index) == 4


def test_search_errors():
    index = fs.EmbeddingIndex(2)
    with pytest.raises(EmbeddingIndexError, match="empty"):
        index.search(torch.zeros(1, 2), 1)
    index.add(torch.zeros(3, 2))
    with pytest.raises(EmbeddingIndexError, match="at least 1"):
        index.search(torch.zeros(1, 2), 0)
    with pytest.raises(EmbeddingIndexError, match="larger than"):
        index.search(torch.zeros(1, 2), 4)
    with pytest.raises(InputShapeError, match="dimension 3"):
        index.search(torch.zeros(1, 3), 1)
    with pytest.raises(EmbeddingIndexError, match="row 1 contains NaN"):
        index.search(torch.tensor([[0.0, 0.0], [float("nan"), 0.0]]), 1)
    with pytest.raises(EmbeddingIndexError, match="must be an int"):
        index.search(torch.zeros(1, 2), 1.5)  # type: ignore[arg-type]


def test_constructor_errors():
    with pytest.raises(EmbeddingIndexError, match="dim"):
        fs.EmbeddingIndex(0)
    with pytest.raises(EmbeddingIndexError, match="dtype"):
        fs.EmbeddingIndex(4, dtype=torch.float64)
    with pytest.raises(EmbeddingIndexError, match="memory_budget"):
        fs.EmbeddingIndex(4096, memory_budget=1000)


def test_zero_queries_and_numpy_float64_input():
    index = fs.EmbeddingIndex(2)
    index.add(np.array([[0.0, 1.0], [2.0, 3.0]]))
    dist, found = index.search(np.zeros((0, 2)), 1)
    assert dist.shape == (0, 1) and found.shape == (0, 1)


def test_to_cpu_returns_same_index():
    index = fs.EmbeddingIndex(2)
    index.add(torch.zeros(1, 2))
    assert index.to("cpu") is index
    assert "n=1" in repr(index)


def test_worker_threads_match_single_lane_and_restore_thread_count():
    g, q, ids = make_data("near", 2000, 16, 200, 4)
    index = fs.EmbeddingIndex(16)
    index.add(g, ids=ids)
    gal = index._gallery()
    before = torch.get_num_threads()
    qt = torch.as_tensor(q)
    one = _schedule.search_exact(gal, qt, 6, 1 << 22, fs.index.SearchConfig(threads=1))
    three = _schedule.search_exact(gal, qt, 6, 1 << 22, fs.index.SearchConfig(threads=3))
    assert torch.get_num_threads() == before
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


def test_worker_errors_propagate():
    from featurescope.index._search._threads import run_in_threads

    before = torch.get_num_threads()

    def fail():
        raise RuntimeError("worker broke")

    with pytest.raises(RuntimeError, match="worker broke"):
        run_in_threads([fail, lambda: None])
    assert torch.get_num_threads() == before


def test_stream_pipeline_logic_on_cpu_lanes():
    # The CUDA path deals tiles to streams; with no-op contexts the same code runs on the CPU.
    import contextlib

    g, q, ids = make_data("duplicates", 1500, 8, 230, 9)
    index = fs.EmbeddingIndex(8)
    index.add(g, ids=ids)
    gal = index._gallery()
    qt = torch.as_tensor(q)
    k = 5
    keep = min(len(g), k + max(8, k))
    plan = TilePlan(32, 256, keep, 8, False)
    job = _schedule._new_job(gal, qt, k, plan, 1 << 20)
    _schedule._run_pipelined(job, [contextlib.nullcontext] * 3)
    out_d, out_r = job.out_d, job.out_r
    ref_d, ref_i = brute_force(g, ids, q, k)
    assert torch.equal(index._store.ids[out_r], ref_i)
    assert torch.equal(out_d, ref_d)


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([0, -1], "entry 1 is -1, which the index reserves"),
        ([2**63 - 1], "reserves"),
        (np.array([1, 2**63], dtype=np.uint64), "must fit int64.*9223372036854775808"),
        ([5, 2**64 + 5], "must fit int64"),
        (torch.tensor([3, 2**40], dtype=torch.uint64), None),  # fits: accepted
    ],
)
def test_ids_that_pad_results_or_would_wrap_are_refused(ids, match):
    index = fs.EmbeddingIndex(2)
    if match is None:
        index.add(torch.zeros(2, 2), ids=ids)
        assert index.ids.tolist() == [3, 2**40]
        return
    with pytest.raises(EmbeddingIndexError, match=match):
        index.add(torch.zeros(len(ids), 2), ids=ids)
    assert len(index) == 0


def test_automatic_ids_stop_before_the_reserved_maximum():
    index = fs.EmbeddingIndex(1)
    index.add(torch.zeros(1, 1), ids=[2**63 - 3])
    index.add(torch.zeros(1, 1))  # takes 2**63 - 2, the last free one
    with pytest.raises(EmbeddingIndexError, match="automatic ids .* pass ids="):
        index.add(torch.zeros(1, 1))
    assert index.ids.tolist() == [2**63 - 3, 2**63 - 2]
