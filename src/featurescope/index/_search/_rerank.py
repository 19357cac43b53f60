"""The float64 re-rank: exact keys of the fast pass's candidates, the second pass for queries
whose candidate list may be incomplete, and the exhaustive search for large ``k``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from featurescope.index._search._backends import FLOAT32, Backend
from featurescope.index._search._gallery import Gallery
from featurescope.index._search._merge import lex_smallest, lex_smallest_grouped
from featurescope.index._search._metric import Queries
from featurescope.index._search._plan import TilePlan
from featurescope.index._search._profile import count, peak

__all__ = ["collect", "exhaustive", "finish_tile"]

_INT64_MAX = torch.iinfo(torch.int64).max


def _rerank_rows(gal: Gallery, q64: Tensor, rows: Tensor, budget: int, cache: int) -> Tensor:
    """Float64 keys of ``q64[i]`` and ``vectors[rows[i, j]]``, in ``cache``-byte chunks."""
    r, m = rows.shape
    out = torch.empty(r, m, dtype=torch.float64, device=q64.device)
    if r == 0 or m == 0:
        return out
    d = gal.vectors.shape[1]
    per_query = 8 * m * d
    chunk = max(1, min(budget // (3 * per_query), cache // per_query))
    rows = gal.rows_of(rows).to(gal.vectors.device)
    for s in range(0, r, chunk):
        e = min(r, s + chunk)
        cand = gal.vectors.index_select(0, rows[s:e].reshape(-1)).view(e - s, m, d)
        out[s:e] = gal.metric.exact(q64[s:e], cand)
    return out


def _rerank_pairs(
    gal: Gallery, q64: Tensor, who: Tensor, rows: Tensor, budget: int, cache: int
) -> Tensor:
    """Float64 keys of ``q64[who[p]]`` and ``vectors[rows[p]]``, in ``cache``-byte chunks."""
    out = torch.empty(rows.numel(), dtype=torch.float64, device=q64.device)
    d = gal.vectors.shape[1]
    chunk = max(1, min(budget // (3 * 8 * d), cache // (8 * d)))
    real = gal.rows_of(rows).to(gal.vectors.device)
    who = who.to(q64.device)
    for s in range(0, rows.numel(), chunk):
        cand = gal.vectors.index_select(0, real[s : s + chunk])
        out[s : s + chunk] = gal.metric.exact(q64.index_select(0, who[s : s + chunk]), cand)
    return out


def finish_tile(
    gal: Gallery, qs: Queries, vals: Tensor, rows: Tensor, k: int, budget: int, cache: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Re-rank a tile's candidates; flag queries whose candidate list may be incomplete.

    Returns:
        ``(dist, rows, incomplete, theta)``: ``[b, k]`` float64 distances and gallery rows, a
        ``[b]`` bool mask and the ``[b]`` score thresholds to search those queries again with.
    """
    n = gal.size
    keep = rows.shape[1]
    head = _rerank_rows(gal, qs.exact, rows[:, :k], budget, cache).to(vals.device)
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
        tail[who, col] = _rerank_pairs(gal, qs.exact, who, rows[who, col + k], budget, cache).to(
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


def collect(
    gal: Gallery,
    qs: Queries,
    theta: Tensor,
    k: int,
    plan: TilePlan,
    block: Tensor,
    budget: int,
    backend: Backend = FLOAT32,
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
        backend.scores_into(qs.product, tile, norms, scores)
        count("rows scored", stop - start)
        peak("score block bytes", scores.numel() * scores.element_size())
        r, c = (scores <= limit[:, None]).nonzero(as_tuple=True)
        for s in range(0, r.numel(), pair_chunk):
            rr, cc = r[s : s + pair_chunk], c[s : s + pair_chunk] + start
            real = gal.rows_of(cc)
            vecs = gal.vectors[real.to(gal.vectors.device)]
            dist = gal.metric.exact(qs.exact[rr.to(qs.exact.device)], vecs).to(device)
            best = _merge_pairs(best, rr, dist, cc, gal.ids[real])
    return best[0], best[1]


def exhaustive(
    gal: Gallery, queries: Tensor, k: int, budget: int, cache: int
) -> tuple[Tensor, Tensor]:
    """Every float64 key of a query tile, then the (key, id) sort: for large ``k``.

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
    cells = max(d, min(cache, budget // 4) // 8)
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
        peak("exhaustive query rows", b - a)
        pick = lex_smallest(dist, ids.expand(b - a, n), k)
        out_d[a:b] = dist.gather(1, pick)
        out_r[a:b] = pick
    return out_d, out_r
