"""Exact k-nearest-neighbour search: a fast pass with a proven error bound, then float64.

The fast pass multiplies in float32 or, where the processor makes it faster, in bfloat16
(``_gemm``; the bound then also covers the operands' and the output's rounding, see
:func:`_bf16_error`).

The fast pass ranks gallery vectors ``x`` for a query ``q`` by ``‖x−c‖² − 2⟨q−c, x⟩`` (``c`` the
gallery's centre), one matrix product per tile. It keeps more candidates than asked for, and a
rounding-error bound on that product says how far a float32 score can be from the exact one. The
kept candidates are re-ranked by their float64 distance; a query whose candidate list might have
missed a true neighbour (many vectors inside the error bound: duplicates, near-duplicates) is
searched again collecting *every* vector inside the bound, in memory-bounded chunks. Ties in
float64 distance go to the smaller id.

Centring the query matters: the product's rounding error grows with ``‖q−c‖·‖x‖`` instead of
``‖q‖·‖x‖``, so data far from the origin (``x + 1000``) keeps a narrow bound.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from featurescope.index.search._gemm import (
    BF16_LOWER,
    PRODUCT_DTYPE,
    choose_backend,
    scores_into,
)
from featurescope.index.search._merge import lex_smallest, lex_smallest_grouped
from featurescope.index.search._metric import METRICS, Metric, Queries, error_coefficients
from featurescope.index.search._threads import run_in_threads
from featurescope.index.search._profile import phase

__all__ = [
    "Gallery",
    "TilePlan",
    "centred_sq_norms",
    "plan_tiles",
    "rounding_error",
    "search_exact",
]

#: Vectors with a larger Euclidean norm would overflow the float32 pass.
MAX_NORM = 2.0**49
#: Group size of the two-level selection (minimum of each group, then top-k of the minima).
GROUP = 16
#: Fewest gallery columns per tile the CPU plan prefers.
GALLERY_TILE = 4096
#: Floats per score block on the CPU (8 MiB): written by the product, read back from cache.
BLOCK_CELLS = 2 * 2**20
#: Bytes of float64 candidates re-ranked at a time (cache-sized).
RERANK_BYTES = 4 * 2**20
#: Fewest queries worth a CPU worker thread of their own.
MIN_QUERIES_PER_WORKER = 16
#: Fewest gallery rows worth a CPU worker thread when few queries split the gallery instead.
MIN_ROWS_PER_WORKER = 4096
#: Fewest queries for which a search makes the bfloat16 copy of a gallery (see _pick_backend).
MIN_QUERIES_LOW_PRECISION = 256
#: Fewest searched rows for which a search may use the bfloat16 product (see _pick_backend).
MIN_ROWS_LOW_PRECISION = 2048
#: Fewest candidates beyond ``k`` a query keeps when the product runs in bfloat16.
LOW_PRECISION_EXTRA = 48
#: Block results buffered before they are merged down to ``keep`` per query.
MERGE_EVERY = 16
_U32 = 2.0**-24
#: Unit roundoff of bfloat16 (8-bit significand, round to nearest).
_U16 = 2.0**-8
_INT64_MAX = torch.iinfo(torch.int64).max


#: Float64 cells per chunk when squared norms are computed on the fly (1 MiB).
NORM_CELLS = 2**17


def centred_sq_norms(
    x: Tensor, centre: Tensor, out: Tensor | None = None, work: Tensor | None = None
) -> Tensor:
    """``‖x[i] − centre‖²`` computed in float64, rounded once to float32, in bounded chunks.

    The index stores these for in-memory galleries and recomputes them tile by tile for
    galleries left on disk; both give the same float32 values. ``work`` (float64, at least
    ``min(NORM_CELLS, n·d)`` cells) and ``out`` let a search reuse its buffers tile after
    tile instead of leaving the allocator to cache fresh ones.
    """
    n, d = x.shape
    out = torch.empty(n, dtype=torch.float32, device=x.device) if out is None else out[:n]
    c64 = centre.to(device=x.device, dtype=torch.float64)
    chunk = max(1, NORM_CELLS // max(d, 1))
    if work is None:
        work = torch.empty(min(n, chunk) * d, dtype=torch.float64, device=x.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        rel = work[: (e - s) * d].view(e - s, d)
        torch.sub(x[s:e], c64, out=rel)
        out[s:e] = rel.square_().sum(1)
    return out


def unit_rows(x: Tensor) -> Tensor:
    """Float32 rows ``x / ‖x‖``, divided in float64 and rounded once (zero rows stay zero), in
    bounded chunks: a tile of a gallery left on disk as a cosine search reads it."""
    out = torch.empty_like(x, dtype=torch.float32)
    chunk = max(1, NORM_CELLS // max(1, x.shape[1]))
    for s in range(0, x.shape[0], chunk):
        x64 = x[s : s + chunk].to(torch.float64)
        norm = torch.linalg.vector_norm(x64, dim=1, keepdim=True)
        out[s : s + chunk] = torch.where(norm > 0, x64 / norm.clamp(min=2.0**-1000), 0.0)
    return out


def rounding_error(rounded: Tensor, rows: Tensor) -> Tensor:
    """``‖rounded[i] − rows[i]‖`` per row, both float64, where ``rows`` came from a float64
    subtraction (``x − centre``): padded for that subtraction's own rounding, inexact only for
    far-apart exponents. The error bounds of stored and bfloat16 copies of rows both use it."""
    diff = torch.linalg.vector_norm(rounded - rows, dim=1)
    pad = torch.linalg.vector_norm(rows, dim=1)
    error: Tensor = diff * (1 + 1e-12) + 1e-15 * pad
    return error


class _LowPrecisionCopy:
    """``bf16(search[i] + offset)``, made once when a search first needs it.

    Rounding the centred rows (not ``search`` itself, which for float32 galleries is the raw
    vectors) keeps the bound narrow for data far from the origin.

    Shared by a gallery and its :meth:`Gallery.restrict` views (``dataclasses.replace`` passes
    the same object on), so filtered searches gather from it too.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value: Tensor | None = None
        self.error = 0.0  # max ‖bf16(row) − row‖ over the rows, measured in float64

    def get(self, search: Tensor, offset: Tensor) -> Tensor:
        with self._lock:
            if self.value is None:
                value = torch.empty(search.shape, dtype=torch.bfloat16, device=search.device)
                chunk = max(1, NORM_CELLS // max(1, search.shape[1]))
                off = offset.to(search.device)
                worst = 0.0
                for s in range(0, search.shape[0], chunk):
                    rows = search[s : s + chunk].to(torch.float64) + off
                    value[s : s + chunk] = rows
                    err = rounding_error(value[s : s + chunk].to(torch.float64), rows)
                    worst = max(worst, float(err.max()))
                self.error = worst
                self.value = value
            return self.value


@dataclass
class Gallery:
    """What a search reads from an index; built by :class:`~featurescope.EmbeddingIndex`.

    ``search[i] + offset`` approximates ``vectors[i] − centre`` to within ``eps[i]`` (zero when
    ``search`` *is* ``vectors``, with ``offset = −centre``). ``norms`` is ``None`` for galleries
    left on disk: tiles then compute theirs. ``subset`` (ascending rows) restricts a search to
    those rows; the kernel then works in positions ``0 .. len(subset)-1`` and :meth:`rows_of`
    maps them back.

    Searches whose product runs in bfloat16 (see ``_gemm``) read a bfloat16 copy of
    ``search + offset``: for galleries in memory it is made on the first such search and kept
    (half the size of float32 rows); galleries left on disk convert each tile instead.
    """

    search: Tensor  # [n, d] storage dtype, on the index device
    norms: Tensor | None  # [n] float32: ‖search[i] + offset‖², rounded to nearest
    offset: Tensor  # [d] float64
    centre: Tensor  # [d] float32
    vectors: Tensor  # [n, d] float32, the exact values
    ids: Tensor  # [n] int64, on the index device
    eps_max: float  # max ‖search[i] + offset − (vectors[i] − centre)‖
    norm_max: float  # max norms[i]
    radius_max: float  # max ‖search[i]‖
    subset: Tensor | None = None  # [m] int64 ascending rows searched, on the index device
    metric: Metric = METRICS["l2"]
    low: _LowPrecisionCopy = dataclasses.field(default_factory=_LowPrecisionCopy, repr=False)

    @property
    def size(self) -> int:
        """Rows a search goes through."""
        return int(self.subset.numel()) if self.subset is not None else int(self.search.shape[0])

    @property
    def copies_tiles(self) -> bool:
        """Whether each tile is copied (to float32, or gathered from a subset) before use."""
        return self.subset is not None or self.search.dtype != torch.float32

    def restrict(self, rows: Tensor) -> Gallery:
        """The same gallery searching only ``rows`` (ascending)."""
        return dataclasses.replace(self, subset=rows.to(self.search.device))

    def rows_of(self, pos: Tensor) -> Tensor:
        """Gallery rows of search positions ``pos``."""
        return pos if self.subset is None else self.subset[pos]

    def workspace(self, width: int) -> tuple[Tensor, Tensor] | None:
        """Buffers :meth:`tile` reuses for tiles up to ``width`` rows (``None``: norms stored)."""
        if self.norms is not None:
            return None
        d = self.search.shape[1]
        device = self.search.device
        return (
            torch.empty(min(width * d, max(d, NORM_CELLS)), dtype=torch.float64, device=device),
            torch.empty(width, dtype=torch.float32, device=device),
        )

    @property
    def centred_radius(self) -> float:
        """A bound on ``‖search[i] + offset‖`` (the norms are those squared, rounded)."""
        return math.sqrt(self.norm_max * (1 + 2.0**-22))

    def _offset_is_zero(self) -> bool:
        return not bool(self.offset.any())

    def low_precision_ready(self) -> bool:
        """Whether a bfloat16 search needs no copy made first (one exists, or storage is bf16)."""
        return self._reads_search_itself() or (
            self.norms is not None and self.low.value is not None
        )

    def _reads_search_itself(self) -> bool:
        return self.search.dtype == torch.bfloat16 and self._offset_is_zero()

    def low_precision_error(self) -> float:
        """Largest ``‖b̃ − (search[i] + offset)‖`` of the bfloat16 rows ``b̃`` a product reads.

        Measured for galleries in memory (when their copy is made); zero for bfloat16 storage;
        for galleries on disk, whose tiles are centred in float32 and then rounded, bounded by
        ``(2⁻⁸ + 2⁻²³) ·`` :attr:`centred_radius`.
        """
        if self._reads_search_itself():
            return 0.0
        if self.norms is None:
            return (_U16 + 2 * _U32) * self.centred_radius
        self.low.get(self.search, self.offset)
        return self.low.error

    def tile(
        self,
        start: int,
        stop: int,
        work: tuple[Tensor, Tensor] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        """Float32 search rows and squared norms of positions ``start:stop``.

        With ``dtype=torch.bfloat16`` the rows are ``bf16(search + offset)`` instead (the
        product's operands then need no offset).
        """
        low = dtype == torch.bfloat16
        source = self.search
        if low and not self._reads_search_itself() and self.norms is not None:
            source = self.low.get(source, self.offset)
        if self.subset is None:
            tile = source[start:stop]
            norms = self.norms[start:stop] if self.norms is not None else None
        else:
            rows = self.subset[start:stop]
            tile = source.index_select(0, rows)
            norms = self.norms.index_select(0, rows) if self.norms is not None else None
        if norms is None:  # only float32 galleries are left on disk: search is vectors
            buf, into = work if work is not None else (None, None)
            if self.metric.uses_norms:
                norms = centred_sq_norms(tile, self.centre, into, buf)
            else:
                norms = torch.zeros(stop - start, dtype=torch.float32, device=tile.device)
                if not self.metric.searches_vectors:
                    tile = unit_rows(tile)
            if low:
                tile = tile - self.centre
        if tile.dtype != dtype:
            tile = tile.to(dtype)
        return tile, norms


@dataclass(frozen=True)
class TilePlan:
    """How one search is cut into tiles so its temporaries fit ``memory_budget`` bytes."""

    query_tile: int
    gallery_tile: int
    keep: int
    dim: int
    upcast: bool  # gallery tiles are copied to float32 before the product
    fresh_norms: bool = False  # each tile's squared norms are computed (gallery on disk)
    low_precision: bool = False  # the product runs in bfloat16 (a tile copy and its output)

    def scan_bytes(self) -> int:
        """Peak bytes of the fast pass's temporaries for one query tile."""
        bq, bn, keep = self.query_tile, self.gallery_tile, self.keep
        block = 4 * bq * bn  # the float32 score block
        minima = 4 * bq * (bn // GROUP + 1)
        select = bq * keep * GROUP * (8 + 4) + bq * keep * 3 * (8 + 4)
        buffered = bq * keep * (MERGE_EVERY + 1) * (4 + 8)
        upcast = 4 * bn * self.dim if self.upcast else 0
        query = 4 * bq * self.dim
        fresh = (
            8 * min(bn * self.dim, max(self.dim, NORM_CELLS)) + 4 * bn if self.fresh_norms else 0
        )
        low = 2 * bq * bn + 2 * bn * self.dim + 2 * bq * self.dim if self.low_precision else 0
        return block + minima + select + buffered + upcast + query + fresh + low


def plan_tiles(
    nq: int,
    nb: int,
    dim: int,
    keep: int,
    budget: int,
    *,
    upcast: bool = False,
    device_type: str = "cpu",
    fresh_norms: bool = False,
    low_precision: bool = False,
) -> TilePlan:
    """Choose tile sizes whose temporaries stay within ``budget`` bytes.

    On the CPU a score block holds about :data:`BLOCK_CELLS` floats, so it stays in cache
    between the product that writes it and the selection that reads it. Its shape follows
    ``dim``: long vectors make the product dominate and want many queries per tile (the
    product packs each gallery panel once per tile); short ones make the selection matter and
    want wide gallery tiles (selection costs less per score on wide rows). A GPU takes blocks
    as large as the budget allows. Few queries let gallery tiles grow instead.

    Raises:
        ValueError: if even a 1 × ``keep`` tile does not fit.
    """
    nq, nb = max(nq, 1), max(nb, 1)
    if device_type == "cpu":
        cells = BLOCK_CELLS
        bq_pref = min(1024, max(256, 1 << round(math.log2(max(dim, 1)))))
        bn_pref = max(GALLERY_TILE, cells // bq_pref)
    else:
        cells = 64 * BLOCK_CELLS
        bq_pref, bn_pref = 8192, 4 * GALLERY_TILE
    bn = min(nb, bn_pref)
    extra = (fresh_norms, low_precision)
    while True:
        plan = TilePlan(1, bn, keep, dim, upcast, *extra)
        if plan.scan_bytes() <= budget or bn <= keep:
            break
        bn = max(keep, bn // 2)
    if plan.scan_bytes() > budget:
        raise ValueError(f"memory_budget={budget} bytes is too small for one query (dim={dim})")
    per_row = TilePlan(2, bn, keep, dim, upcast, *extra).scan_bytes() - plan.scan_bytes()
    bq = min(nq, bq_pref, 1 + (budget - plan.scan_bytes()) // max(per_row, 1))
    while bn < nb:
        wider = TilePlan(bq, min(nb, 2 * bn), keep, dim, upcast, *extra)
        if bq * wider.gallery_tile > cells or wider.scan_bytes() > budget:
            break
        bn = wider.gallery_tile
    return TilePlan(bq, bn, keep, dim, upcast, *extra)


def _scan_tile(
    q: Tensor,
    gal: Gallery,
    plan: TilePlan,
    block: Tensor,
    backend: str = "torch",
    lo: int = 0,
    hi: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Fast pass for one query tile: the ``keep`` smallest float32 scores and their rows.

    Selection keeps, per query, a buffer of candidates and a threshold ``tau`` (the
    ``keep``-th smallest score of the buffer when it was last compressed). In a tile only the
    groups whose minimum is below ``tau`` can hold a score that matters, and after the first
    tiles they are few: one pass of group minima, a comparison on the minima and a gather of
    those groups replace a top-k per tile (FAISS's heap does the same with one comparison
    per score). A tile with too many candidates for the buffer takes the top-k route.

    Returns:
        ``(scores, rows)``, both ``[bq, keep]``, scores sorted ascending.
    """
    bq, keep = q.shape[0], plan.keep
    n = gal.size if hi is None else hi
    sel = _Selection(bq, keep, q.device)
    work = gal.workspace(plan.gallery_tile)
    for start in range(lo, n, plan.gallery_tile):
        stop = min(n, start + plan.gallery_tile)
        w = stop - start
        tile, norms = gal.tile(start, stop, work, q.dtype)
        scores = block[: bq * w].view(bq, w)
        with phase("product"):
            scores_into(q, tile, norms, scores, backend)
        with phase("selection"):
            sel.add(scores, start)
    with phase("selection"):
        return sel.result()


def _below(minima: Tensor, tau: Tensor, step: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(row, column)`` of the entries of ``minima`` below their row's ``tau``.

    With ``step`` (``minima`` columns in ``GROUP`` interleaved groups, as the scores are), the
    groups' own minima are screened first, so the scan of the full array (``nonzero`` is slow
    on the CPU) only covers the few groups that can hold an entry.
    """
    if step is None:
        r, c = (minima < tau[:, None]).nonzero(as_tuple=True)
        return r, c
    bq, span = minima.shape
    top = minima.view(bq, GROUP, span // GROUP).amin(1)
    r2, c2 = (top < tau[:, None]).nonzero(as_tuple=True)
    cols = c2[:, None] + step  # [P2, GROUP] columns of minima
    vals = minima.view(-1).index_select(0, ((r2 * span)[:, None] + cols).view(-1))
    i, j = (vals.view_as(cols) < tau[r2][:, None]).nonzero(as_tuple=True)
    return r2[i], cols[i, j]


class _Selection:
    """Per-query candidate buffers of one query tile; see :func:`_scan_tile`."""

    def __init__(self, bq: int, keep: int, device: torch.device) -> None:
        self.keep = keep
        self.width = keep * (MERGE_EVERY + 1)
        self.vals = torch.full((bq, self.width), math.inf, dtype=torch.float32, device=device)
        self.pos = torch.full((bq, self.width), -1, dtype=torch.int64, device=device)
        self.filled = torch.zeros(bq, dtype=torch.int64, device=device)
        self.tau = torch.full((bq,), math.inf, dtype=torch.float32, device=device)
        self.seen = 0
        self.rows = torch.arange(bq, device=device)
        self._steps: dict[int, Tensor] = {}

    def _step(self, w: int, device: torch.device) -> Tensor:
        if w not in self._steps:
            self._steps[w] = torch.arange(GROUP, device=device) * (w // GROUP)
        return self._steps[w]

    def _compress(self) -> None:
        """Keep each row's ``keep`` smallest; ``tau`` becomes the largest of them."""
        keep = self.keep
        used = max(keep, int(self.filled.max()))
        vals, j = self.vals[:, :used].topk(keep, dim=1, largest=False, sorted=False)
        pos = self.pos[:, :used].gather(1, j)
        self.vals[:, keep:used].fill_(math.inf)
        self.vals[:, :keep] = vals
        self.pos[:, :keep] = pos
        self.filled.fill_(keep)
        if self.seen >= keep:
            self.tau = vals.amax(1)

    def _append(self, r: Tensor, vals: Tensor, pos: Tensor, counts: Tensor) -> None:
        """Write candidates ``(r, vals, pos)``, grouped by row ``r``, after each row's fill."""
        starts = counts.cumsum(0) - counts
        dest = self.filled[r] + torch.arange(r.numel(), device=r.device) - starts[r]
        self.vals[r, dest] = vals
        self.pos[r, dest] = pos
        self.filled += counts

    def _topk_tile(self, scores: Tensor, start: int) -> None:
        bq, w = scores.shape
        kb = min(self.keep, w)
        if w % GROUP == 0 and w // GROUP >= 2 * self.keep:
            # Each of the kb smallest scores lies in one of the kb groups with the smallest
            # minimum, so only kb * GROUP scores need a real top-k.
            minima = scores.view(bq, GROUP, w // GROUP).amin(1)
            groups = minima.topk(kb, dim=1, largest=False, sorted=False).indices
            cols = (groups[:, :, None] + self._step(w, scores.device)).view(bq, kb * GROUP)
            vals, j = scores.gather(1, cols).topk(kb, dim=1, largest=False, sorted=False)
            rows = cols.gather(1, j)
        else:
            vals, rows = scores.topk(kb, dim=1, largest=False, sorted=False)
        if int(self.filled.max()) + kb > self.width:
            self._compress()
        counts = torch.full_like(self.filled, kb)
        self._append(
            self.rows.repeat_interleave(kb), vals.reshape(-1), (rows + start).reshape(-1), counts
        )

    def add(self, scores: Tensor, start: int) -> None:
        """Take a tile's scores (gallery positions ``start ..``) into the buffers."""
        bq, w = scores.shape
        grouped = w % GROUP == 0 and w // GROUP >= 2 * self.keep
        if self.seen < self.keep or not grouped:
            self._topk_tile(scores, start)
            self.seen += w
            if self.seen >= self.keep:
                self._compress()
            return
        self.seen += w
        span = w // GROUP
        minima = scores.view(bq, GROUP, span).amin(1)
        # A score equal to tau cannot change the multiset of the keep smallest: strict <.
        r, c = _below(
            minima, self.tau, self._step(span, scores.device) if span % GROUP == 0 else None
        )
        if r.numel() == 0:
            return
        cols = c[:, None] + self._step(w, scores.device)
        flat = ((r * w)[:, None] + cols).view(-1)
        vals = scores.view(-1).index_select(0, flat).view_as(cols)
        i, j = (vals < self.tau[r][:, None]).nonzero(as_tuple=True)
        rr = r[i]
        counts = torch.bincount(rr, minlength=bq)
        if int((self.filled + counts).max()) > self.width:
            self._compress()
            if int(counts.max()) > self.width - self.keep:
                self._topk_tile(scores, start)
                return
        self._append(rr, vals[i, j], cols[i, j] + start, counts)
        # A tight threshold keeps the next tiles' candidates few; compressing costs a top-k
        # of the filled columns only.
        if int(self.filled.max()) >= 2 * self.keep:
            self._compress()

    def result(self) -> tuple[Tensor, Tensor]:
        """The ``keep`` smallest scores of each row, ascending, and their positions."""
        kf = min(self.keep, self.seen)
        vals, j = self.vals.topk(kf, dim=1, largest=False, sorted=True)
        return vals, self.pos.gather(1, j)


def _rerank_rows(gal: Gallery, q64: Tensor, rows: Tensor, budget: int) -> Tensor:
    """Float64 distances of ``q64[i]`` to ``vectors[rows[i, j]]``, in cache-sized chunks."""
    r, m = rows.shape
    out = torch.empty(r, m, dtype=torch.float64, device=q64.device)
    if r == 0 or m == 0:
        return out
    d = gal.vectors.shape[1]
    per_query = 8 * m * d
    chunk = max(1, min(budget // (3 * per_query), RERANK_BYTES // per_query))
    rows = gal.rows_of(rows).to(gal.vectors.device)
    for s in range(0, r, chunk):
        e = min(r, s + chunk)
        cand = gal.vectors.index_select(0, rows[s:e].reshape(-1)).view(e - s, m, d)
        out[s:e] = gal.metric.exact(q64[s:e], cand)
    return out


def _rerank_pairs(gal: Gallery, q64: Tensor, who: Tensor, rows: Tensor, budget: int) -> Tensor:
    """Float64 distances of ``q64[who[p]]`` to ``vectors[rows[p]]``, in cache-sized chunks."""
    out = torch.empty(rows.numel(), dtype=torch.float64, device=q64.device)
    d = gal.vectors.shape[1]
    chunk = max(1, min(budget // (3 * 8 * d), RERANK_BYTES // (8 * d)))
    real = gal.rows_of(rows).to(gal.vectors.device)
    who = who.to(q64.device)
    for s in range(0, rows.numel(), chunk):
        cand = gal.vectors.index_select(0, real[s : s + chunk])
        out[s : s + chunk] = gal.metric.exact(q64.index_select(0, who[s : s + chunk]), cand)
    return out


def _finish_tile(
    gal: Gallery, qs: Queries, vals: Tensor, rows: Tensor, k: int, budget: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Re-rank a tile's candidates; flag queries whose candidate list may be incomplete.

    Returns:
        ``(dist, rows, incomplete, theta)``: ``[b, k]`` float64 distances and gallery rows, a
        ``[b]`` bool mask and the ``[b]`` score thresholds to search those queries again with.
    """
    n = gal.size
    keep = rows.shape[1]
    head = _rerank_rows(gal, qs.exact, rows[:, :k], budget).to(vals.device)
    # k distinct vectors lie within the largest of these distances, so every true neighbour
    # scores at most theta in the fast pass.
    theta = gal.metric.threshold(head.max(1).values, qs)
    inside = (vals.to(torch.float64) <= theta[:, None]).sum(1).clamp_(min=k)
    incomplete = (inside >= keep) & (keep < n)
    most = int(inside.max())
    dist, cand = head, rows[:, :k]
    if most > k:
        # Only the candidates inside each query's own threshold: few queries reach ``most``.
        cols = torch.arange(k, most, device=vals.device)
        who, col = (cols[None, :] < inside[:, None]).nonzero(as_tuple=True)
        tail = torch.full(
            (rows.shape[0], most - k), math.inf, dtype=torch.float64, device=vals.device
        )
        tail[who, col] = _rerank_pairs(gal, qs.exact, who, rows[who, col + k], budget).to(
            vals.device
        )
        dist, cand = torch.cat([head, tail], 1), rows[:, :most]
    pick = lex_smallest(dist, gal.ids[gal.rows_of(cand)], k)
    return dist.gather(1, pick), cand.gather(1, pick), incomplete, theta


def _merge_pairs(
    best: tuple[Tensor, Tensor, Tensor], r: Tensor, dist: Tensor, rows: Tensor, ids: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge scattered ``(query r, row, dist, id)`` candidates into each query's best ``k``."""
    bd, brow, bid = best
    f, k = bd.shape
    who = torch.cat([torch.arange(f, device=bd.device).repeat_interleave(k), r])
    d_all = torch.cat([bd.reshape(-1), dist])
    row_all = torch.cat([brow.reshape(-1), rows])
    id_all = torch.cat([bid.reshape(-1), ids])
    take = lex_smallest_grouped(who, d_all, id_all, f, k)
    return d_all[take].view(f, k), row_all[take].view(f, k), id_all[take].view(f, k)


def _collect(
    gal: Gallery,
    qs: Queries,
    theta: Tensor,
    k: int,
    plan: TilePlan,
    block: Tensor,
    budget: int,
    backend: str = "torch",
) -> tuple[Tensor, Tensor]:
    """Exact top-k for queries with many near-ties: re-rank *every* vector within ``theta``."""
    f = qs.centred.shape[0]
    device = qs.centred.device
    limit = torch.nextafter(theta.float(), torch.tensor(math.inf, device=device))
    best = (
        torch.full((f, k), math.inf, dtype=torch.float64, device=device),
        torch.full((f, k), -1, dtype=torch.int64, device=device),
        torch.full((f, k), _INT64_MAX, dtype=torch.int64, device=device),
    )
    d = gal.vectors.shape[1]
    pair_chunk = max(1, budget // (3 * 8 * d))
    n = gal.size
    work = gal.workspace(plan.gallery_tile)
    for start in range(0, n, plan.gallery_tile):
        stop = min(n, start + plan.gallery_tile)
        tile, norms = gal.tile(start, stop, work, qs.product.dtype)
        scores = block[: f * (stop - start)].view(f, stop - start)
        scores_into(qs.product, tile, norms, scores, backend)
        r, c = (scores <= limit[:, None]).nonzero(as_tuple=True)
        for s in range(0, r.numel(), pair_chunk):
            rr, cc = r[s : s + pair_chunk], c[s : s + pair_chunk] + start
            real = gal.rows_of(cc)
            vecs = gal.vectors[real.to(gal.vectors.device)]
            dist = gal.metric.exact(qs.exact[rr.to(qs.exact.device)], vecs).to(device)
            best = _merge_pairs(best, rr, dist, cc, gal.ids[real])
    return best[0], best[1]


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
    backend: str = "torch"


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
    low = PRODUCT_DTYPE[job.backend] == torch.bfloat16
    return job.gal.metric.prepare(job.queries[a:b], job.gal, job.rel, job.absolute, low)


def _scan(job: _Job, a: int, b: int, block: Tensor) -> _Scanned:
    qs = _prepare(job, a, b)
    vals, rows = _scan_tile(qs.product, job.gal, job.plan, block, job.backend)
    return _Scanned(a, b, qs, vals, rows, block)


def _finish(job: _Job, t: _Scanned) -> None:
    gal, k, qs = job.gal, job.k, t.queries
    with phase("re-rank"):
        dist, found, incomplete, theta = _finish_tile(gal, qs, t.scores, t.rows, k, job.budget)
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
            dist[redo], found[redo] = _collect(
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


def search_exact(
    gal: Gallery,
    queries: Tensor,
    k: int,
    budget: int,
    *,
    streams: int = 2,
    workers: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact k nearest gallery rows of each query, ties to the smaller id.

    On the CPU, query batches go to ``workers`` threads (default: the caller's
    ``torch.get_num_threads()``) that each run single-threaded operations: many small
    operations then never wait for one another at a parallel barrier, which on a busy machine
    costs more than they compute. On a GPU, query batches are spread over ``streams`` CUDA
    streams. When ``k`` is at least half the searched rows, or the fast pass's candidate lists
    would not fit ``budget``, every distance is computed in float64 a query tile at a time and
    sorted (``k`` up to the gallery size, memory bounded by the tile).

    Args:
        gal: the gallery, possibly restricted to a subset of rows.
        queries: ``[nq, d]`` float32 on the gallery's device, finite.
        k: neighbours per query, ``k >= 1``; when fewer rows are searched, the missing
            neighbours are padded with row ``-1`` and distance ``+inf``.
        budget: bytes the temporaries of the search may take, all workers together.
        streams: CUDA streams (ignored on the CPU).
        workers: CPU worker threads (ignored on a GPU).

    Returns:
        ``(distances, rows)``: ``[nq, k]`` float64 Euclidean distances, ascending, and the
        gallery rows they belong to.
    """
    n, d = gal.size, gal.search.shape[1]
    nq = queries.shape[0]
    device = queries.device
    out_d = torch.full((nq, k), math.inf, dtype=torch.float64, device=device)
    out_r = torch.full((nq, k), -1, dtype=torch.int64, device=device)
    kk = min(k, n)
    if nq == 0 or kk == 0:
        return out_d, out_r
    split = 1
    if device.type == "cuda":
        lanes = max(1, streams)
    else:
        threads = torch.get_num_threads() if workers is None else workers
        lanes = max(1, min(threads, nq // MIN_QUERIES_PER_WORKER))
        if lanes == 1:
            # Few queries: the workers split the gallery instead, for latency.
            split = max(1, min(threads, n // MIN_ROWS_PER_WORKER))
    per_lane = -(-nq // lanes) if device.type == "cpu" else nq
    plan: TilePlan | None = None
    backend = "torch"
    if 2 * kk < n:
        if device.type == "cpu":
            backend = _pick_backend(gal, queries, per_lane)
        low = PRODUCT_DTYPE[backend] == torch.bfloat16
        # The bfloat16 bound is wider: more vectors lie within it, so keep more candidates.
        keep = min(n, kk + (max(LOW_PRECISION_EXTRA, 2 * kk) if low else max(8, kk)))
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
            )
        except ValueError:
            plan = None
    if plan is None:
        sorted_d, sorted_r = _exhaustive(gal, queries, kk, budget)
    else:
        sorted_d, sorted_r = _fast(gal, queries, kk, budget, plan, lanes, per_lane, split, backend)
    out_d[:, :kk] = sorted_d
    out_r[:, :kk] = gal.rows_of(sorted_r)
    return out_d, out_r


def _pick_backend(gal: Gallery, queries: Tensor, rows: int) -> str:
    """The CPU product backend for this search (timed once per vector length; see ``_gemm``).

    ``bf16`` needs a bfloat16 copy of the gallery (or, on disk, of each tile): a search of
    fewer than :data:`MIN_QUERIES_LOW_PRECISION` queries would spend more making it than the
    product saves, so it stays in float32 unless the copy is there already. Fewer than
    :data:`MIN_ROWS_LOW_PRECISION` searched rows (a narrow filter) make the product cheap
    whatever its precision, and float32's tighter bound sends fewer candidates to the re-rank.
    """
    if not gal.metric.uses_norms:
        # The bfloat16 bound is derived for the L2 score; other metrics multiply in float32.
        return "torch"
    allow_low = gal.size >= MIN_ROWS_LOW_PRECISION and (
        queries.shape[0] >= MIN_QUERIES_LOW_PRECISION or gal.low_precision_ready()
    )

    def sample() -> tuple[Tensor, Tensor]:
        return gal.tile(0, min(gal.size, GALLERY_TILE))

    # Timed on a worker thread, single-threaded like the workers that will run the product.
    chosen: list[str] = []
    run_in_threads([lambda: chosen.append(choose_backend(queries, sample, rows, gal.size, allow_low))])
    return chosen[0]


def _fast(
    gal: Gallery,
    queries: Tensor,
    k: int,
    budget: int,
    plan: TilePlan,
    lanes: int,
    per_lane: int,
    split: int = 1,
    backend: str = "torch",
) -> tuple[Tensor, Tensor]:
    """The fast pass with its bound, the float64 re-rank and, if needed, the second pass.

    On the CPU everything runs on single-threaded operations: query ranges on ``lanes``
    workers, or, for few queries, gallery ranges on ``split`` workers whose candidate lists
    are merged before the re-rank.
    """
    nq, d = queries.shape
    device = queries.device
    rel, absolute = error_coefficients(d, device)
    out_d = torch.empty(nq, k, dtype=torch.float64, device=device)
    out_r = torch.empty(nq, k, dtype=torch.int64, device=device)
    job = _Job(
        gal, queries, k, plan, budget // max(lanes, split), rel, absolute, out_d, out_r, backend
    )
    if device.type == "cuda":
        if lanes > 1:
            _run_on_streams(job, lanes)
        else:
            _run_tiles(job, 0, nq)
        return out_d, out_r
    if lanes > 1:
        ranges = [(a, min(nq, a + per_lane)) for a in range(0, nq, per_lane)]
        run_in_threads([functools.partial(_run_tiles, job, a, b) for a, b in ranges])
    elif split > 1:
        _run_split(job, split)
    else:
        run_in_threads([functools.partial(_run_tiles, job, 0, nq)])
    return out_d, out_r


def _run_split(job: _Job, split: int) -> None:
    """Few queries: ``split`` workers scan a gallery range each; merge, then re-rank."""
    n, tile = job.gal.size, job.plan.gallery_tile
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
            parts[i] = _scan_tile(qs.product, job.gal, job.plan, blocks[i], job.backend, lo, hi)

        run_in_threads([functools.partial(scan, i) for i in range(len(bounds))])
        vals = torch.cat([p[0] for p in parts], 1)
        rows = torch.cat([p[1] for p in parts], 1)
        with phase("selection"):
            vals, j = vals.topk(min(job.plan.keep, vals.shape[1]), dim=1, largest=False)
        _finish(job, _Scanned(a, b, qs, vals, rows.gather(1, j), blocks[0]))
    del tile


def _exhaustive(gal: Gallery, queries: Tensor, k: int, budget: int) -> tuple[Tensor, Tensor]:
    """Every float64 distance of a query tile, then the (distance, id) sort: for large ``k``.

    A query tile holds its ``[bq, n]`` distances and the sort's index arrays (about 40 bytes a
    cell), sized to ``budget``; a single query always runs, whatever its row costs.
    """
    nq, d = queries.shape
    n = gal.size
    device = queries.device
    out_d = torch.empty(nq, k, dtype=torch.float64, device=device)
    out_r = torch.empty(nq, k, dtype=torch.int64, device=device)
    bq = max(1, min(nq, budget // (40 * n)))
    # Float64 differences of one query chunk against one gallery chunk.
    cells = max(d, min(RERANK_BYTES, budget // 4) // 8)
    ids = gal.ids[gal.rows_of(torch.arange(n, device=gal.ids.device))]
    for a in range(0, nq, bq):
        b = min(nq, a + bq)
        q64 = queries[a:b].to(device=gal.vectors.device, dtype=torch.float64)
        dist = torch.empty(b - a, n, dtype=torch.float64, device=gal.vectors.device)
        cols = max(1, cells // ((b - a) * d))
        for s in range(0, n, cols):
            e = min(n, s + cols)
            pos = torch.arange(s, e, device=gal.search.device)
            vecs = gal.vectors.index_select(0, gal.rows_of(pos).to(gal.vectors.device))
            dist[:, s:e] = gal.metric.exact(q64, vecs[None].expand(b - a, e - s, d))
        dist = dist.to(device)
        pick = lex_smallest(dist, ids.expand(b - a, n), k)
        out_d[a:b] = dist.gather(1, pick)
        out_r[a:b] = pick
    return out_d, out_r


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
