"""Exact k-nearest-neighbour search: a fast float32 pass with a proven error bound, then float64.

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

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Gallery", "TilePlan", "exact_distances", "plan_tiles", "search_exact"]

#: Vectors with a larger Euclidean norm would overflow the float32 pass.
MAX_NORM = 2.0**49
#: Group size of the two-level selection (minimum of each group, then top-k of the minima).
GROUP = 16
#: Gallery columns per tile when the memory budget allows.
GALLERY_TILE = 8192
#: Block results buffered before they are merged down to ``keep`` per query.
MERGE_EVERY = 16
_U32 = 2.0**-24
_INT64_MAX = torch.iinfo(torch.int64).max


@dataclass
class Gallery:
    """What a search reads from an index; built by :class:`~featurescope.EmbeddingIndex`.

    ``search[i] + offset`` approximates ``vectors[i] − centre`` to within ``eps[i]`` (zero when
    ``search`` *is* ``vectors``, with ``offset = −centre``).
    """

    search: Tensor  # [n, d] storage dtype, on the index device
    norms: Tensor  # [n] float32: ‖search[i] + offset‖², rounded to nearest
    offset: Tensor  # [d] float64
    centre: Tensor  # [d] float32
    vectors: Tensor  # [n, d] float32, the exact values
    ids: Tensor  # [n] int64, on the index device
    eps_max: float  # max ‖search[i] + offset − (vectors[i] − centre)‖
    norm_max: float  # max norms[i]
    radius_max: float  # max ‖search[i]‖


@dataclass(frozen=True)
class TilePlan:
    """How one search is cut into tiles so its temporaries fit ``memory_budget`` bytes."""

    query_tile: int
    gallery_tile: int
    keep: int
    dim: int
    upcast: bool  # gallery tiles are copied to float32 before the product

    def scan_bytes(self) -> int:
        """Peak bytes of the fast pass's temporaries for one query tile."""
        bq, bn, keep = self.query_tile, self.gallery_tile, self.keep
        block = 4 * bq * bn  # the float32 score block
        minima = 4 * bq * (bn // GROUP + 1)
        select = bq * keep * GROUP * (8 + 4) + bq * keep * 3 * (8 + 4)
        buffered = bq * keep * (MERGE_EVERY + 1) * (4 + 8)
        upcast = 4 * bn * self.dim if self.upcast else 0
        query = 4 * bq * self.dim
        return block + minima + select + buffered + upcast + query


def plan_tiles(
    nq: int, nb: int, dim: int, keep: int, budget: int, *, upcast: bool = False
) -> TilePlan:
    """Choose tile sizes whose temporaries stay within ``budget`` bytes.

    Gallery tiles of :data:`GALLERY_TILE` columns keep the product efficient; query tiles take
    what the budget leaves. A small ``nq`` lets gallery tiles grow instead.

    Raises:
        ValueError: if even a 1 × ``keep`` tile does not fit.
    """
    nq, nb = max(nq, 1), max(nb, 1)
    bn = min(nb, GALLERY_TILE)
    while True:
        plan = TilePlan(1, bn, keep, dim, upcast)
        if plan.scan_bytes() <= budget or bn <= keep:
            break
        bn = max(keep, bn // 2)
    if plan.scan_bytes() > budget:
        raise ValueError(f"memory_budget={budget} bytes is too small for one query (dim={dim})")
    per_row = TilePlan(2, bn, keep, dim, upcast).scan_bytes() - plan.scan_bytes()
    bq = min(nq, 1 + (budget - plan.scan_bytes()) // max(per_row, 1))
    if bq == nq and bn < nb:
        # Few queries: spend the rest of the budget on wider gallery tiles (fewer, larger ops).
        while bn < nb:
            wider = TilePlan(bq, min(nb, 2 * bn), keep, dim, upcast)
            if wider.scan_bytes() > budget or wider.gallery_tile > 16 * GALLERY_TILE:
                break
            bn = wider.gallery_tile
    return TilePlan(bq, bn, keep, dim, upcast)


def exact_distances(queries: Tensor, candidates: Tensor) -> Tensor:
    """Float64 Euclidean distances of each query to its own candidate rows.

    Args:
        queries: ``[r, d]`` float64.
        candidates: ``[r, m, d]`` or, with ``m`` squeezed, ``[r, d]``; any float dtype.

    The same expression serves every code path, so that equal pairs give bit-equal distances.
    """
    cand = candidates.to(torch.float64)
    q = queries[:, None, :] if cand.dim() == 3 else queries
    return ((q - cand) ** 2).sum(-1).sqrt()


def _product_rounding(device: torch.device) -> float:
    """Relative error a matrix product may add per term by rounding its float32 inputs."""
    precision = torch.get_float32_matmul_precision()
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        precision = "high" if precision == "highest" else precision
    if precision == "medium":  # bfloat16 inputs
        return 2.0**-7 + 2.0**-16
    if precision == "high":  # TensorFloat-32 (or better) inputs
        return 2.0**-10 + 2.0**-22
    return 0.0


def _error_coefficients(dim: int, device: torch.device) -> tuple[float, float]:
    """Relative and absolute bound on one float32 score ``‖x̃‖² − 2⟨q', x̃⟩``.

    With ``n = d + 2`` roundings in any summation order, ``γₙ = nu/(1−nu)`` bounds the relative
    error of the sum of absolute terms (Higham, *Accuracy and Stability*, §3.1); underflow adds at
    most half a subnormal spacing per term. Doubled as a margin against BLAS paths we cannot see.
    """
    n = dim + 2
    if n * _U32 >= 0.25:
        raise ValueError(f"dim={dim} is too large for a float32 error bound")
    gamma = n * _U32 / (1 - n * _U32)
    rel = 2.0 * (gamma + _product_rounding(device) * (1 + gamma))
    return rel, 2.0 * n * 2.0**-149


def _scan_tile(q: Tensor, gal: Gallery, plan: TilePlan, block: Tensor) -> tuple[Tensor, Tensor]:
    """Fast pass for one query tile: the ``keep`` smallest float32 scores and their rows.

    Returns:
        ``(scores, rows)``, both ``[bq, keep]``, scores sorted ascending.
    """
    bq, keep, n = q.shape[0], plan.keep, gal.search.shape[0]
    device = q.device
    width = keep * (MERGE_EVERY + 1)
    acc_v = torch.empty(bq, width, dtype=torch.float32, device=device)
    acc_p = torch.empty(bq, width, dtype=torch.int64, device=device)
    filled = 0
    steps: dict[int, Tensor] = {}
    for start in range(0, n, plan.gallery_tile):
        stop = min(n, start + plan.gallery_tile)
        w = stop - start
        tile = gal.search[start:stop]
        if tile.dtype != torch.float32:
            tile = tile.float()
        scores = block[: bq * w].view(bq, w)
        torch.addmm(gal.norms[start:stop], q, tile.T, beta=1, alpha=-2, out=scores)
        kb = min(keep, w)
        if w % GROUP == 0 and w // GROUP >= 2 * keep:
            # Each of the kb smallest scores lies in one of the kb groups with the smallest
            # minimum, so only kb * GROUP scores need a real top-k.
            span = w // GROUP
            if w not in steps:
                steps[w] = torch.arange(GROUP, device=device) * span
            minima = scores.view(bq, GROUP, span).amin(1)
            groups = minima.topk(kb, dim=1, largest=False, sorted=False).indices
            cols = (groups[:, :, None] + steps[w]).view(bq, kb * GROUP)
            vals, j = scores.gather(1, cols).topk(kb, dim=1, largest=False, sorted=False)
            rows = cols.gather(1, j)
        else:
            vals, rows = scores.topk(kb, dim=1, largest=False, sorted=False)
        if filled + kb > width:
            filled = _compress(acc_v, acc_p, filled, keep)
        acc_v[:, filled : filled + kb] = vals
        acc_p[:, filled : filled + kb] = rows + start
        filled += kb
    kf = min(keep, filled)
    vals, j = acc_v[:, :filled].topk(kf, dim=1, largest=False, sorted=True)
    return vals, acc_p[:, :filled].gather(1, j)


def _compress(acc_v: Tensor, acc_p: Tensor, filled: int, keep: int) -> int:
    vals, j = acc_v[:, :filled].topk(keep, dim=1, largest=False, sorted=False)
    rows = acc_p[:, :filled].gather(1, j)
    acc_v[:, :keep] = vals
    acc_p[:, :keep] = rows
    return keep


@dataclass
class _Queries:
    """One query tile in the forms the passes need."""

    centred: Tensor  # [b, d] float32 on the index device: fl(q − c)
    exact: Tensor  # [b, d] float64 on the vectors' device
    constant: Tensor  # [b] float64: ‖q'‖² − 2⟨q', offset⟩, on the index device
    slack: Tensor  # [b] float64: ε_q + ε_max
    error: Tensor  # [b] float64: bound on |score − exact score|


def _prepare(q32: Tensor, gal: Gallery, rel: float, absolute: float) -> _Queries:
    centred = q32 - gal.centre
    q64 = q32.to(torch.float64)
    c64 = centred.to(torch.float64)
    eps_q = torch.linalg.vector_norm(c64 - (q64 - gal.centre.to(torch.float64)), dim=1)
    constant = (c64 * c64).sum(1) - 2.0 * (c64 @ gal.offset)
    qnorm = torch.linalg.vector_norm(c64, dim=1)
    error = rel * (gal.norm_max + 2.0 * qnorm * gal.radius_max) + absolute
    return _Queries(
        centred=centred,
        exact=q64.to(gal.vectors.device),
        constant=constant,
        slack=eps_q * (1 + 1e-12) + gal.eps_max,
        error=error,
    )


def _threshold(upper: Tensor, qs: _Queries) -> Tensor:
    """Largest float32 score a vector within float64 distance ``upper`` of the query can get."""
    reach = upper * (1 + 1e-12) + qs.slack
    theta = reach * reach - qs.constant + qs.error
    return theta + 1e-12 * (reach * reach + qs.constant.abs() + qs.error)


def _lex_smallest(dist: Tensor, ids: Tensor, k: int) -> Tensor:
    """Column indices of the ``k`` smallest ``(dist, id)`` pairs of each row, in order."""
    order = ids.argsort(dim=1, stable=True)
    by_dist = dist.gather(1, order).argsort(dim=1, stable=True)
    return order.gather(1, by_dist)[:, :k]


def _rerank_rows(gal: Gallery, q64: Tensor, rows: Tensor, budget: int) -> Tensor:
    """Float64 distances of ``q64[i]`` to ``vectors[rows[i, j]]``, in budget-sized chunks."""
    r, m = rows.shape
    out = torch.empty(r, m, dtype=torch.float64, device=q64.device)
    if r == 0 or m == 0:
        return out
    d = gal.vectors.shape[1]
    chunk = max(1, budget // (3 * 8 * m * d))
    rows = rows.to(gal.vectors.device)
    for s in range(0, r, chunk):
        e = min(r, s + chunk)
        cand = gal.vectors[rows[s:e].reshape(-1)].view(e - s, m, d)
        out[s:e] = exact_distances(q64[s:e], cand)
    return out


def _finish_tile(
    gal: Gallery, qs: _Queries, vals: Tensor, rows: Tensor, k: int, budget: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Re-rank a tile's candidates; flag queries whose candidate list may be incomplete.

    Returns:
        ``(dist, rows, incomplete, theta)``: ``[b, k]`` float64 distances and gallery rows, a
        ``[b]`` bool mask and the ``[b]`` score thresholds to search those queries again with.
    """
    n = gal.search.shape[0]
    keep = rows.shape[1]
    head = _rerank_rows(gal, qs.exact, rows[:, :k], budget).to(vals.device)
    # k distinct vectors lie within the largest of these distances, so every true neighbour
    # scores at most theta in the fast pass.
    theta = _threshold(head.max(1).values, qs)
    inside = (vals.to(torch.float64) <= theta[:, None]).sum(1).clamp_(min=k)
    incomplete = (inside >= keep) & (keep < n)
    most = int(inside.max())
    dist, cand = head, rows[:, :k]
    if most > k:
        tail = _rerank_rows(gal, qs.exact, rows[:, k:most], budget).to(vals.device)
        cols = torch.arange(k, most, device=vals.device)
        tail.masked_fill_(cols[None, :] >= inside[:, None], math.inf)
        dist, cand = torch.cat([head, tail], 1), rows[:, :most]
    pick = _lex_smallest(dist, gal.ids[cand], k)
    return dist.gather(1, pick), cand.gather(1, pick), incomplete, theta


def _merge_pairs(
    best: tuple[Tensor, Tensor, Tensor], r: Tensor, dist: Tensor, rows: Tensor, ids: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge scattered ``(query r, row, dist, id)`` candidates into each query's best ``k``."""
    bd, brow, bid = best
    f, k = bd.shape
    device = bd.device
    who = torch.cat([torch.arange(f, device=device).repeat_interleave(k), r])
    d_all = torch.cat([bd.reshape(-1), dist])
    row_all = torch.cat([brow.reshape(-1), rows])
    id_all = torch.cat([bid.reshape(-1), ids])
    order = id_all.argsort(stable=True)
    order = order[d_all[order].argsort(stable=True)]
    order = order[who[order].argsort(stable=True)]
    sorted_who = who[order]
    first = torch.searchsorted(sorted_who, torch.arange(f, device=device))
    rank = torch.arange(order.numel(), device=device) - first[sorted_who]
    take = order[rank < k]
    return d_all[take].view(f, k), row_all[take].view(f, k), id_all[take].view(f, k)


def _collect(
    gal: Gallery, qs: _Queries, theta: Tensor, k: int, plan: TilePlan, block: Tensor, budget: int
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
    n = gal.search.shape[0]
    for start in range(0, n, plan.gallery_tile):
        stop = min(n, start + plan.gallery_tile)
        tile = gal.search[start:stop]
        if tile.dtype != torch.float32:
            tile = tile.float()
        scores = block[: f * (stop - start)].view(f, stop - start)
        torch.addmm(gal.norms[start:stop], qs.centred, tile.T, beta=1, alpha=-2, out=scores)
        r, c = (scores <= limit[:, None]).nonzero(as_tuple=True)
        for s in range(0, r.numel(), pair_chunk):
            rr, cc = r[s : s + pair_chunk], c[s : s + pair_chunk] + start
            vecs = gal.vectors[cc.to(gal.vectors.device)]
            dist = exact_distances(qs.exact[rr.to(qs.exact.device)], vecs).to(device)
            best = _merge_pairs(best, rr, dist, cc, gal.ids[cc])
    return best[0], best[1]


@contextlib.contextmanager
def _on_stream(stream: torch.cuda.Stream | None) -> Iterator[None]:
    if stream is None:
        yield
    else:
        with torch.cuda.stream(stream):
            yield


def search_exact(
    gal: Gallery, queries: Tensor, k: int, budget: int, *, streams: int = 2
) -> tuple[Tensor, Tensor]:
    """Exact k nearest gallery rows of each query, ties to the smaller id.

    Args:
        gal: the gallery; must hold at least ``k`` vectors.
        queries: ``[nq, d]`` float32 on the gallery's device, finite.
        k: neighbours per query, ``1 <= k <= n``.
        budget: bytes the temporaries of the search may take.
        streams: CUDA streams that query tiles are spread over (ignored on CPU).

    Returns:
        ``(distances, rows)``: ``[nq, k]`` float64 Euclidean distances, ascending, and the
        gallery rows they belong to.
    """
    n, d = gal.search.shape
    nq = queries.shape[0]
    device = queries.device
    keep = min(n, k + max(8, k))
    upcast = gal.search.dtype != torch.float32
    use_streams = device.type == "cuda" and streams > 1
    n_streams = streams if use_streams else 1
    plan = plan_tiles(nq, n, d, keep, budget // n_streams, upcast=upcast)
    rel, absolute = _error_coefficients(d, device)
    out_d = torch.empty(nq, k, dtype=torch.float64, device=device)
    out_r = torch.empty(nq, k, dtype=torch.int64, device=device)
    if nq == 0:
        return out_d, out_r
    side: list[torch.cuda.Stream | None] = [None]
    if use_streams:
        main = torch.cuda.current_stream(device)
        side = [torch.cuda.Stream(device) for _ in range(n_streams)]
        for s in side:
            assert s is not None
            s.wait_stream(main)
    blocks = [
        torch.empty(plan.query_tile * plan.gallery_tile, dtype=torch.float32, device=device)
        for _ in side
    ]
    for t, start in enumerate(range(0, nq, plan.query_tile)):
        stop = min(nq, start + plan.query_tile)
        with _on_stream(side[t % len(side)]):
            block = blocks[t % len(side)]
            qs = _prepare(queries[start:stop], gal, rel, absolute)
            vals, rows = _scan_tile(qs.centred, gal, plan, block)
            dist, found, incomplete, theta = _finish_tile(gal, qs, vals, rows, k, budget)
            redo = incomplete.nonzero().flatten()
            if redo.numel():
                sub = _Queries(
                    qs.centred[redo],
                    qs.exact[redo.to(qs.exact.device)],
                    qs.constant[redo],
                    qs.slack[redo],
                    qs.error[redo],
                )
                dist[redo], found[redo] = _collect(gal, sub, theta[redo], k, plan, block, budget)
            out_d[start:stop] = dist
            out_r[start:stop] = found
    if use_streams:
        main = torch.cuda.current_stream(device)
        for s in side:
            assert s is not None
            main.wait_stream(s)
    return out_d, out_r
