"""The fast pass over one query tile: score blocks and a two-level selection of candidates."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from featurescope.index._search._backends import FLOAT32, Backend
from featurescope.index._search._gallery import Gallery
from featurescope.index._search._plan import GROUP, TilePlan
from featurescope.index._search._profile import count, peak, phase

__all__ = ["Selection", "scan_tile"]


def scan_tile(
    q: Tensor,
    gal: Gallery,
    plan: TilePlan,
    block: Tensor,
    backend: Backend = FLOAT32,
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
    sel = Selection(bq, keep, q.device, plan.merge_every)
    work = gal.workspace(plan.gallery_tile)
    for start in range(lo, n, plan.gallery_tile):
        stop = min(n, start + plan.gallery_tile)
        w = stop - start
        tile, norms = gal.tile(start, stop, work, q.dtype)
        scores = block[: bq * w].view(bq, w)
        with phase("product"):
            backend.scores_into(q, tile, norms, scores)
        count("rows scored", w)
        peak("score block bytes", scores.numel() * scores.element_size())
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


class Selection:
    """Per-query candidate buffers of one query tile; see :func:`scan_tile`."""

    def __init__(self, bq: int, keep: int, device: torch.device, merge_every: int = 16) -> None:
        self.keep = keep
        self.width = keep * (merge_every + 1)
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
