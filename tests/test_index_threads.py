"""Searches from several threads at once: the same answers as one at a time, settings restored."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

import featurescope as fs


def _blas_threads() -> list[tuple[str, int]]:
    import threadpoolctl

    return [(i["prefix"], i["num_threads"]) for i in threadpoolctl.threadpool_info()]


@pytest.mark.parametrize("backend", ["float32", "numpy", "bfloat16"])
def test_concurrent_searches_equal_serial_and_restore_thread_settings(backend):
    rng = np.random.default_rng(0)
    g = rng.standard_normal((6000, 24)).astype(np.float32)
    g[3000:] = g[:3000]  # ties everywhere
    config = fs.index.SearchConfig(backend=backend)
    index = fs.EmbeddingIndex(24, memory_budget=1 << 22, config=config)
    index.add(g, ids=rng.permutation(6000), labels=rng.integers(0, 3, 6000))
    calls = [
        (rng.standard_normal((n, 24)).astype(np.float32), k, where)
        for n, k, where in [
            (200, 5, None),
            (64, 9, index.select(labels=[1])),
            (1, 3, None),
            (300, 1, index.labels != 2),
            (40, 4000, None),
            (120, 7, None),
        ]
    ]
    torch.set_num_threads(2)
    before = (torch.get_num_threads(), _blas_threads())
    serial = [index.search(q, k, where=w) for q, k, w in calls]
    assert (torch.get_num_threads(), _blas_threads()) == before
    results: list = [None] * (3 * len(calls))
    errors: list[BaseException] = []
    start = threading.Barrier(len(results))

    def run(i: int) -> None:
        q, k, w = calls[i % len(calls)]
        try:
            start.wait()
            results[i] = index.search(q, k, where=w)
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, got in enumerate(results):
        want = serial[i % len(calls)]
        assert torch.equal(got.ids, want.ids) and torch.equal(got.distances, want.distances)
    assert (torch.get_num_threads(), _blas_threads()) == before


def test_search_restores_a_caller_thread_count_of_one():
    index = fs.EmbeddingIndex(8)
    index.add(torch.randn(2000, 8))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        index.search(torch.randn(100, 8), 3)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("workers", [2, 3])
def test_few_queries_split_the_gallery_exactly(workers):
    # Under 16 queries per worker, workers take gallery ranges; duplicates straddle the ranges.
    from featurescope.index._search import _schedule

    rng = np.random.default_rng(5)
    base = rng.standard_normal((500, 6)).astype(np.float32)
    g = base[rng.integers(0, 500, 20000)]
    ids = rng.permutation(20000)
    index = fs.EmbeddingIndex(6)
    index.add(g, ids=ids)
    q = torch.from_numpy(np.concatenate([g[:3], rng.standard_normal((4, 6)).astype(np.float32)]))
    gal = index._gallery()
    dist, rows, _ = _schedule.search_exact(
        gal, q, 7, 1 << 22, fs.index.SearchConfig(threads=workers)
    )
    d64 = ((q.double()[:, None] - torch.from_numpy(g).double()[None]) ** 2).sum(-1).sqrt()
    for r in range(len(q)):
        order = np.lexsort((ids, d64[r].numpy()))[:7]
        assert index.ids[rows[r]].tolist() == ids[order].tolist()
        assert torch.equal(dist[r], d64[r, order])


def test_search_leaves_other_threads_torch_and_blas_settings_alone():
    # A search runs its own single-threaded workers; the thread counts other threads see (and
    # threads started during the search inherit) never change, and their matrix work is right.
    import threadpoolctl

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = np.random.default_rng(11)
        index = fs.EmbeddingIndex(32, memory_budget=1 << 22)
        index.add(rng.standard_normal((20000, 32)).astype(np.float32))
        queries = rng.standard_normal((256, 32)).astype(np.float32)
        blas = [i["num_threads"] for i in threadpoolctl.threadpool_info()]
        a = torch.from_numpy(rng.standard_normal((300, 200)))
        b = torch.from_numpy(rng.standard_normal((200, 300)))
        want = (a.numpy() @ b.numpy()).sum()
        seen: list[int] = []
        sums: list[float] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen.append(torch.get_num_threads())
                sums.append(float((a @ b).sum()))
                # A thread started during the search inherits the process default.
                t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
                t.start()
                t.join()

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for _ in range(3):
                index.search(queries, 5)
                assert torch.get_num_threads() == 2
        finally:
            stop.set()
            watcher.join()
        assert seen and set(seen) == {2}
        assert np.allclose(sums, want, rtol=1e-9)
        assert [i["num_threads"] for i in threadpoolctl.threadpool_info()] == blas
    finally:
        torch.set_num_threads(saved)


def test_workers_run_single_threaded_operations():
    from featurescope.index._search._threads import run_in_threads, thread_local_setters

    if not thread_local_setters():
        pytest.skip("no thread-local thread-count setter in this build of torch")
    counts: list[int] = []
    run_in_threads([lambda: counts.append(torch.get_num_threads())] * 2)
    assert counts == [1, 1]


def _cpu_share_of_calling_thread(fn) -> float:
    """The calling thread's CPU time over the whole process's while ``fn`` runs."""
    # OpenBLAS's and OpenMP's idle threads spin for a while after parallel work: let them sleep.
    time.sleep(0.5)
    thread, process = time.thread_time(), time.process_time()
    fn()
    return (time.thread_time() - thread) / (time.process_time() - process)


def test_openblas_product_runs_on_the_calling_thread_and_changes_no_setting():
    # numpy's OpenBLAS has one process-wide thread count. The numpy backend multiplies through
    # its batched product with one matrix, which runs on the calling thread alone: all the CPU
    # time is the caller's, while np.matmul at the same count spreads over OpenBLAS's threads.
    import threadpoolctl

    from featurescope.index._search._openblas import SMALL, openblas_sgemm

    sgemm = openblas_sgemm()
    if sgemm is None:
        pytest.skip("no loaded OpenBLAS has the batched product")
    rng = np.random.default_rng(3)
    a = torch.from_numpy(rng.standard_normal((512, 256), dtype=np.float32))
    b = torch.from_numpy(rng.standard_normal((768, 256), dtype=np.float32))
    c = torch.from_numpy(rng.standard_normal((512, 768), dtype=np.float32))
    assert SMALL < 512 * 768 * 256  # the batched path, not its small-matrix one
    want = c.double() - 2 * a.double() @ b.double().T
    # Any summation order: (k + 2) roundings of the absolute terms (Higham's gamma), doubled.
    bound = 2 * 258 * 2.0**-24 * (c.double().abs() + 2 * a.double().abs() @ b.double().abs().T)
    outs = [c.clone() for _ in range(4)]

    def product(i: int) -> None:
        sgemm(a, b, outs[i], alpha=-2.0, beta=1.0)

    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        share = _cpu_share_of_calling_thread(lambda: [product(i) for i in (0, 1)])
        workers = [threading.Thread(target=product, args=(i,)) for i in (2, 3)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert _blas_threads() == before
        for out in outs:
            assert bool(((out.double() - want).abs() <= bound).all())
        assert share > 0.9
        if (os.cpu_count() or 1) < 2:
            return
        # The control, which shows the measure can fail: OpenBLAS's own entry point at two
        # threads shares the work. Under load its helper thread may not run at all in one try.
        out = np.empty((512, 768), dtype=np.float32)
        spreads = []
        for _ in range(5):
            spreads.append(
                _cpu_share_of_calling_thread(lambda: np.matmul(a.numpy(), b.numpy().T, out))
            )
            if spreads[-1] < 0.8:
                return
        pytest.skip(f"OpenBLAS's np.matmul never used its second thread here ({spreads}): "
                    "the control could not be made")  # fmt: skip


@pytest.mark.parametrize(
    ("caller", "configured", "workers"), [(2, None, 2), (1, None, 1), (2, 3, 3)]
)
def test_a_search_splits_its_queries_over_the_callers_thread_count(caller, configured, workers):
    """The whole search runs on a single-threaded worker, but splits its queries over as many
    workers as the *caller* has threads (or ``config.threads``), not the worker's own one."""
    config = fs.index.SearchConfig(threads=configured, backend="float32")
    index = fs.EmbeddingIndex(16, config=config)
    index.add(torch.randn(3000, 16))
    queries = torch.randn(64 * workers * 8, 16)
    scanning: set[int] = set()

    def profile(frame, event, arg):  # sees the search's workers: each starts after this is set
        if event == "call" and frame.f_code.co_name == "_run_tiles":
            scanning.add(threading.get_ident())

    saved = torch.get_num_threads()
    threading.setprofile(profile)
    try:
        torch.set_num_threads(caller)
        index.search(queries, 5)
    finally:
        threading.setprofile(None)
        torch.set_num_threads(saved)
    assert len(scanning) == workers
