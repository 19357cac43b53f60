"""Exact k-nearest-neighbour search: how a search is scheduled over tiles, workers and streams.

The fast pass scores every gallery row against a query tile with one matrix product per
gallery tile (``_backends``), keeps more candidates than asked for (``_selection``), and a
rounding-error bound on that product (``_metric``) says how far a float32 score can be from the
exact one. The kept candidates are re-ranked by their exact float64 key (``_rerank``); a query
whose candidate list might have missed a true neighbour (many rows inside the bound: duplicates,
near-duplicates) is searched again collecting *every* row inside the bound, in memory-bounded
chunks. Ties in the key go to the smaller id (``_merge``). Tiles are sized to the memory budget
(``_plan``); the rows come from a :class:`~._gallery.Gallery`.

For L2, centring the query matters: the product's rounding error grows with ``‖q−c‖·‖x‖``
instead of ``‖q‖·‖x‖``, so data far from the origin (``x + 1000``) keeps a narrow bound.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from featurescope.index._search._backends import (
    BACKENDS,
    FLOAT32,
    Backend,
    choose_backend,
    known_backend,
)
from featurescope.index._search._config import SearchConfig
from featurescope.index._search._gallery import Gallery
from featurescope.index._search._metric import Queries, error_coefficients
from featurescope.index._search._plan import DEFAULT_CONFIG, TilePlan, plan_tiles
from featurescope.index._search._profile import phase
from featurescope.index._search._rerank import collect, exhaustive, finish_tile
from featurescope.index._search._selection import scan_tile
from featurescope.index._search._threads import caller_threads, run_beside, run_in_threads

__all__ = ["Found", "search_exact"]


@dataclass
class _Job:
    """One search: what every query tile shares."""

    gal: Gallery
    queries: Tensor
    k: int
    plan: TilePlan
    budget: int  # per worker or stream
    rel: float
    absolute: float
    out_d: Tensor
    out_r: Tensor
    backend: Backend = FLOAT32
    config: SearchConfig = DEFAULT_CONFIG


@dataclass
class _Scanned:
    """A query tile after the fast pass, waiting for its re-rank."""

    start: int
    stop: int
    queries: Queries
    scores: Tensor
    rows: Tensor
    block: Tensor


def _prepare(job: _Job, a: int, b: int) -> Queries:
    low = job.backend.low_precision
    return job.gal.metric.prepare(job.queries[a:b], job.gal, job.rel, job.absolute, low)


def _scan(job: _Job, a: int, b: int, block: Tensor) -> _Scanned:
    qs = _prepare(job, a, b)
    vals, rows = scan_tile(qs.product, job.gal, job.plan, block, job.backend)
    return _Scanned(a, b, qs, vals, rows, block)


def _finish(job: _Job, t: _Scanned) -> None:
    gal, k, qs = job.gal, job.k, t.queries
    with phase("re-rank"):
        cache = job.config.rerank_bytes
        dist, found, incomplete, theta = finish_tile(
            gal, qs, t.scores, t.rows, k, job.budget, cache
        )
    redo = incomplete.nonzero().flatten()
    if redo.numel():
        sub = Queries(
            qs.centred[redo],
            qs.product[redo],
            qs.exact[redo.to(qs.exact.device)],
            qs.constant[redo],
            qs.slack[redo],
            qs.error[redo],
        )
        with phase("second pass"):
            dist[redo], found[redo] = collect(
                gal, sub, theta[redo], k, job.plan, t.block, job.budget, job.backend
            )
    job.out_d[t.start : t.stop] = dist
    job.out_r[t.start : t.stop] = found


def _new_block(job: _Job) -> Tensor:
    cells = job.plan.query_tile * job.plan.gallery_tile
    return torch.empty(cells, dtype=torch.float32, device=job.queries.device)


def _run_tiles(job: _Job, start: int, stop: int) -> None:
    """Search the query rows ``start:stop`` tile by tile into the outputs."""
    block = _new_block(job)
    for a in range(start, stop, job.plan.query_tile):
        _finish(job, _scan(job, a, min(stop, a + job.plan.query_tile), block))


class Found(NamedTuple):
    """What :func:`search_exact` found, and how."""

    keys: Tensor  # [nq, k] float64 exact keys, ascending (+inf padding)
    rows: Tensor  # [nq, k] int64 gallery rows (-1 padding)
    backend: str  # the product backend that ran, or "float64" when every key was computed


def search_exact(
    gal: Gallery,
    queries: Tensor,
    k: int,
    budget: int,
    config: SearchConfig = DEFAULT_CONFIG,
) -> Found:
    """Exact k nearest gallery rows of each query, ties to the smaller id.

    On the CPU, query batches go to ``config.threads`` worker threads (default: the caller's
    ``torch.get_num_threads()``) that each run single-threaded operations: many small
    operations then never wait for one another at a parallel barrier, which on a busy machine
    costs more than they compute. On a GPU, query batches are spread over ``config.streams``
    CUDA streams. When ``k`` is at least half the searched rows, or the fast pass's candidate
    lists would not fit ``budget``, every key is computed in float64 a query tile at a time and
    sorted (``k`` up to the gallery size, memory bounded by the tile).

    Args:
        gal: the gallery, possibly restricted to a subset of rows.
        queries: ``[nq, d]`` float32 on the gallery's device, finite.
        k: neighbours per query, ``k >= 1``; when fewer rows are searched, the missing
            neighbours are padded with row ``-1`` and distance ``+inf``.
        budget: bytes the temporaries of the search may take, all workers together.
        config: tuning (threads, streams, tiles, backend).

    Returns:
        The ``[nq, k]`` float64 keys of the gallery's metric (ascending) and rows, and the
        name of the backend that ran.
    """
    n, d = gal.size, gal.search.shape[1]
    nq = queries.shape[0]
    device = queries.device
    out_d = torch.full((nq, k), math.inf, dtype=torch.float64, device=device)
    out_r = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    kk = min(k, n)
    if nq == 0 or kk == 0:
        return Found(out_d, out_r, "float64")
    split = 1
    if device.type == "cuda":
        lanes = config.streams
    else:
        threads = caller_threads() if config.threads is None else config.threads
        lanes = max(1, min(threads, nq // config.min_queries_per_worker))
        if lanes == 1:
            # Few queries: the workers split the gallery instead, for latency.
            split = max(1, min(threads, n // config.min_rows_per_worker))
    per_lane = -(-nq // lanes) if device.type == "cpu" else nq
    plan: TilePlan | None = None
    backend = FLOAT32
    if 2 * kk < n:
        if device.type == "cpu":
            backend = _pick_backend(gal, queries, per_lane, config)
        low = backend.low_precision
        # The bfloat16 bound is wider: more vectors lie within it, so keep more candidates.
        keep = min(n, kk + (max(config.low_precision_extra, 2 * kk) if low else max(8, kk)))
        try:
            plan = plan_tiles(
                per_lane,
                -(-n // split),
                d,
                keep,
                budget // max(lanes, split),
                upcast=gal.copies_tiles,
                device_type=device.type,
                fresh_norms=gal.norms is None,
                low_precision=low,
                config=config,
            )
        except ValueError:
            plan = None
    if plan is None:
        sorted_d, sorted_r = exhaustive(gal, queries, kk, budget, config.rerank_bytes)
        name = "float64"
    else:
        job = _new_job(gal, queries, kk, plan, budget // max(lanes, split), backend, config)
        _fast(job, lanes, per_lane, split)
        sorted_d, sorted_r = job.out_d, job.out_r
        name = backend.name
    out_d[:, :kk] = sorted_d
    out_r[:, :kk] = gal.rows_of(sorted_r)
    return Found(out_d, out_r, name)


def _pick_backend(gal: Gallery, queries: Tensor, rows: int, config: SearchConfig) -> Backend:
    """The CPU product backend for this search (raced once per vector length; see ``_backends``).

    bfloat16 needs a bfloat16 copy of the gallery (or, on disk, of each tile): a search of
    fewer than ``config.min_queries_low_precision`` queries would spend more making it than the
    product saves, so it stays in float32 unless the copy is there already. Fewer than
    ``config.min_rows_low_precision`` searched rows (a narrow filter) make the product cheap
    whatever its precision, and float32's tighter bound sends fewer candidates to the re-rank.
    """
    if not gal.metric.uses_norms:
        # The bfloat16 bound is derived for the L2 score; other metrics multiply in float32.
        return BACKENDS["numpy"] if config.backend == "numpy" else FLOAT32
    allow_low = gal.size >= config.min_rows_low_precision and (
        queries.shape[0] >= config.min_queries_low_precision or gal.low_precision_ready()
    )
    known = known_backend(gal.search.shape[1], config, allow_low)
    if known is not None:
        return known

    def sample() -> tuple[Tensor, Tensor]:
        return gal.tile(0, min(gal.size, config.gallery_tile))

    # Timed on a worker thread, single-threaded like the workers that will run the product.
    chosen: list[Backend] = []

    def race() -> None:
        chosen.append(choose_backend(queries, sample, rows, gal.size, config, allow_low))

    run_in_threads([race])
    return chosen[0]


def _new_job(
    gal: Gallery,
    queries: Tensor,
    k: int,
    plan: TilePlan,
    budget: int,
    backend: Backend = FLOAT32,
    config: SearchConfig = DEFAULT_CONFIG,
) -> _Job:
    """A search's shared state, with empty ``[nq, k]`` outputs; ``budget`` per worker."""
    nq, d = queries.shape
    device = queries.device
    rel, absolute = error_coefficients(d, device)
    out_d = torch.empty(nq, k, dtype=torch.float64, device=device)
    out_r = torch.empty(nq, k, dtype=torch.int64, device=device)
    return _Job(gal, queries, k, plan, budget, rel, absolute, out_d, out_r, backend, config)


def _fast(job: _Job, lanes: int, per_lane: int, split: int = 1) -> None:
    """The fast pass with its bound, the float64 re-rank and, if needed, the second pass.

    On the CPU everything runs on single-threaded workers: query ranges on ``lanes``
    workers, or, for few queries, gallery ranges on ``split`` workers whose candidate lists
    are merged before the re-rank.
    """
    nq = job.queries.shape[0]
    if job.queries.device.type == "cuda":
        if lanes > 1:
            _run_on_streams(job, lanes)
        else:
            _run_tiles(job, 0, nq)
    elif lanes > 1:
        ranges = [(a, min(nq, a + per_lane)) for a in range(0, nq, per_lane)]
        run_in_threads([functools.partial(_run_tiles, job, a, b) for a, b in ranges])
    elif split > 1:
        # On a worker too: the merge and the re-rank between the scans are small operations.
        run_in_threads([functools.partial(_run_split, job, split)])
    else:
        run_in_threads([functools.partial(_run_tiles, job, 0, nq)])


def _run_split(job: _Job, split: int) -> None:
    """Few queries: ``split`` workers scan a gallery range each; merge, then re-rank."""
    n = job.gal.size
    per = -(-n // split)
    bounds = [(lo, min(n, lo + per)) for lo in range(0, n, per)]
    blocks = [_new_block(job) for _ in bounds]
    nq = job.queries.shape[0]
    for a in range(0, nq, job.plan.query_tile):
        b = min(nq, a + job.plan.query_tile)
        qs = _prepare(job, a, b)
        parts: list[tuple[Tensor, Tensor]] = [(qs.centred, qs.centred)] * len(bounds)

        def scan(i: int, qs: Queries = qs, parts: list[tuple[Tensor, Tensor]] = parts) -> None:
            lo, hi = bounds[i]
            parts[i] = scan_tile(qs.product, job.gal, job.plan, blocks[i], job.backend, lo, hi)

        run_beside([functools.partial(scan, i) for i in range(len(bounds))])
        vals = torch.cat([p[0] for p in parts], 1)
        rows = torch.cat([p[1] for p in parts], 1)
        with phase("selection"):
            vals, j = vals.topk(min(job.plan.keep, vals.shape[1]), dim=1, largest=False)
        _finish(job, _Scanned(a, b, qs, vals, rows.gather(1, j), blocks[0]))


def _run_on_streams(job: _Job, lanes: int) -> None:
    """Deal query tiles to ``lanes`` CUDA streams (see :func:`_run_pipelined`)."""
    device = job.queries.device
    main = torch.cuda.current_stream(device)
    side = [torch.cuda.Stream(device) for _ in range(lanes)]
    for s in side:
        s.wait_stream(main)
    _run_pipelined(job, [functools.partial(torch.cuda.stream, s) for s in side])
    for s in side:
        main.wait_stream(s)


def _run_pipelined(job: _Job, lanes: list[Callable[[], ContextManager[Any]]]) -> None:
    """Deal query tiles round-robin to ``lanes`` (stream contexts), pipelined.

    A tile's re-rank waits for its stream (it reads how many candidates there are), so the next
    tile's product is queued on another lane first and runs meanwhile. Each lane keeps its own
    score block; a lane's next product is queued after its previous re-rank, in stream order.
    """
    blocks = [_new_block(job) for _ in lanes]
    pending: tuple[int, _Scanned] | None = None
    nq, tile = job.queries.shape[0], job.plan.query_tile
    for i, a in enumerate(range(0, nq, tile)):
        lane = i % len(lanes)
        with lanes[lane]():
            scanned = _scan(job, a, min(nq, a + tile), blocks[lane])
        if pending is not None:
            with lanes[pending[0]]():
                _finish(job, pending[1])
        pending = (lane, scanned)
    if pending is not None:
        with lanes[pending[0]]():
            _finish(job, pending[1])
