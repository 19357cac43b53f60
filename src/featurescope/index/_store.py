"""The tensors behind an :class:`~featurescope.EmbeddingIndex`, and what a search needs from them.

Every row keeps its exact float32 vector, id, label and metadata string, and the search
precomputations: the squared norm of the row relative to the gallery's centre, and, for
half-precision storage, the rounded copy that is searched and how far it is from the exact row.
The centre is the mean of the rows; it is recomputed whenever the number of rows has doubled,
which costs amortised O(d) per added row. Rows searched as they are (float32 storage, L2 or inner
product) are only copied when added: their norms and the centre wait for the next search, so
adding costs a validation pass and a copy, as FAISS's ``add`` does.

Searches read a published :class:`~featurescope.index._snapshot.Snapshot`, which nothing
changes: appended rows go past the end of every snapshot (into spare capacity, or a grown copy),
and whatever rewrites existing rows (re-centring, ``remove``, ``to``) writes fresh tensors. So
an ``add`` copies only its own rows (plus the amortised growth and re-centring), and a search
beside it keeps the old buffers alive until it finishes.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from featurescope.errors import EmbeddingIndexError
from featurescope.index._search._gallery import Gallery, centred_sq_norms, rounding_error
from featurescope.index._search._metric import Metric
from featurescope.index._snapshot import Snapshot

__all__ = ["Store"]

_CPU = torch.device("cpu")


def _put(buf: Tensor, n: int, new: Tensor) -> Tensor:
    """Write ``new`` after the first ``n`` rows of ``buf``, growing it by half when full.

    Rows ``< n`` are never written: published snapshots may be reading them.
    """
    need = n + new.shape[0]
    if buf.shape[0] < need:
        cap = max(need, buf.shape[0] + buf.shape[0] // 2)
        grown = torch.empty((cap, *buf.shape[1:]), dtype=buf.dtype, device=buf.device)
        grown[:n] = buf[:n]
        buf = grown
    buf[n:need] = new.to(buf.device)
    return buf


class Store:
    """Rows of an index; see the module docstring."""

    def __init__(
        self, dim: int, device: torch.device, dtype: torch.dtype, budget: int, metric: Metric
    ) -> None:
        self.dim = dim
        self.metric = metric
        self.device = device
        self.dtype = dtype
        self.budget = budget
        self.n = 0
        self.next_id = 0
        self.metadata: list[str | None] = []
        self._vectors = torch.empty(0, dim, dtype=torch.float32, device=self._vector_device)
        self._search = torch.empty(0, dim, dtype=dtype, device=device)
        self._norms = torch.empty(0, dtype=torch.float32, device=device)
        self._ids = torch.empty(0, dtype=torch.int64, device=device)
        self._labels = torch.empty(0, dtype=torch.int64)
        self._radius = torch.empty(0, dtype=torch.float64)
        self._eps = torch.empty(0, dtype=torch.float64)
        self._centre = torch.zeros(dim, dtype=torch.float32, device=device)
        self._centred_at = 0
        self._ready = 0  # rows whose norms are computed (see _refresh)
        self.version = 0
        #: Held by every change (and by the caller across its checks and the change).
        self.lock = threading.RLock()
        self._published: Snapshot | None = None

    @property
    def _alias(self) -> bool:
        """float32 storage searches the exact vectors themselves: no second copy (except for
        cosine, whose search reads unit rows)."""
        return self.dtype == torch.float32 and self.metric.searches_vectors

    @property
    def _vector_device(self) -> torch.device:
        return self.device if self._alias else _CPU

    @property
    def vectors(self) -> Tensor:
        return self._vectors[: self.n]

    @property
    def ids(self) -> Tensor:
        return self._ids[: self.n]

    @property
    def labels(self) -> Tensor:
        return self._labels[: self.n]

    # -- precomputation ------------------------------------------------------------------

    def _row_stats(
        self, x: Tensor, centre: Tensor, first_row: int = 0
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Searched copy, squared norms, radii and storage errors of rows ``x``.

        Raises:
            EmbeddingIndexError: if a value does not fit the storage dtype.
        """
        m = x.shape[0]
        c64 = centre.to(device=x.device, dtype=torch.float64)
        search = torch.empty(m, self.dim, dtype=self.dtype, device=x.device)
        norms = torch.empty(m, dtype=torch.float32, device=x.device)
        radius = torch.empty(m, dtype=torch.float64, device=x.device)
        eps = torch.zeros(m, dtype=torch.float64, device=x.device)
        chunk = max(1, self.budget // (4 * 8 * self.dim))
        for s in range(0, m, chunk):
            e = min(m, s + chunk)
            x64 = x[s:e].to(torch.float64)
            rel = self.metric.rows(x64, c64)
            stored = rel.to(self.dtype)
            ok = torch.isfinite(stored).all(1)
            if not bool(ok.all()):
                row = first_row + s + int((~ok).nonzero()[0, 0])
                which = f"row {row}" if row >= 0 else "a row already in the index"
                raise EmbeddingIndexError(
                    f"{which} does not fit {self.dtype} storage (its values, less the "
                    f"gallery mean, exceed {torch.finfo(self.dtype).max:.0f}); use "
                    "dtype=torch.bfloat16 or torch.float32"
                )
            s64 = stored.to(torch.float64)
            sq = (s64 * s64).sum(1)
            search[s:e] = stored
            norms[s:e] = sq.float() if self.metric.uses_norms else 0.0
            radius[s:e] = sq.sqrt()
            eps[s:e] = rounding_error(s64, rel) + self.metric.rows_pad(self.dim)
        return search, norms, radius.cpu(), eps.cpu()

    # -- mutation --------------------------------------------------------------------------

    def append(
        self,
        x: Tensor,
        ids: Tensor,
        labels: Tensor,
        metadata: list[str | None],
        radius: Tensor | None = None,
    ) -> None:
        """Add validated rows; raises before changing anything if a row cannot be stored.

        ``radius`` (``‖x[i]‖`` in float64, as validation measured it) saves a pass.
        """
        with self.lock:
            x = x.to(self._vector_device)
            if self._alias:
                self._append_lazily(x, ids, labels, metadata, radius)
            else:
                self._append_computed(x, ids, labels, metadata)
            self.version += 1
            self._published = None

    def _append_computed(
        self, x: Tensor, ids: Tensor, labels: Tensor, metadata: list[str | None]
    ) -> None:
        """Rows searched through a copy (half storage, cosine): compute it now."""
        m = x.shape[0]
        total = self.n + m
        if self.metric.centred and (self._centred_at == 0 or total >= 2 * self._centred_at):
            mean = (
                self.vectors.sum(0, dtype=torch.float64) + x.sum(0, dtype=torch.float64)
            ) / total
            centre = mean.float().to(self.device)
            new_stats = self._row_stats(x, centre)
            if self.n:
                # Rows already stored: re-centred separately to avoid copying all vectors.
                old_stats = self._row_stats(self.vectors, centre, first_row=-self.n)
                stats = tuple(
                    torch.cat([a, b.to(a.device)])
                    for a, b in zip(old_stats, new_stats, strict=True)
                )
            else:
                stats = new_stats
            start, recentred = 0, True
        else:
            centre = self._centre
            stats = self._row_stats(x, centre, first_row=0)
            start, recentred = self.n, False
        search, norms, radius, eps = stats
        # Nothing below can fail on bad input: commit. Re-centred rows go to fresh tensors.
        search = search.to(self.device)
        norms = norms.to(self.device)
        if recentred:
            self._search, self._norms, self._radius, self._eps = search, norms, radius, eps
        else:
            self._search = _put(self._search, start, search)
            self._norms = _put(self._norms, start, norms)
            self._radius = _put(self._radius, start, radius)
            self._eps = _put(self._eps, start, eps)
        self._vectors = _put(self._vectors, self.n, x)
        self._ids = _put(self._ids, self.n, ids.to(self.device))
        self._labels = _put(self._labels, self.n, labels)
        self.metadata.extend(metadata)
        self.next_id = max(self.next_id, int(ids.max()) + 1)
        if recentred:
            self._centre, self._centred_at = centre, total
        self.n = self._ready = total

    def _append_lazily(
        self,
        x: Tensor,
        ids: Tensor,
        labels: Tensor,
        metadata: list[str | None],
        radius: Tensor | None,
    ) -> None:
        """Rows searched as they are: store them; their norms wait for the next search.

        Adding is then one copy (validation made the other pass), and a batch of adds
        re-centres and computes norms once, at the first search (:meth:`_refresh`).
        """
        m = x.shape[0]
        if radius is None:
            radius = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
        self._vectors = _put(self._vectors, self.n, x)
        self._radius = _put(self._radius, self.n, radius.cpu())
        self._eps = _put(self._eps, self.n, torch.zeros(m, dtype=torch.float64))
        self._ids = _put(self._ids, self.n, ids.to(self.device))
        self._labels = _put(self._labels, self.n, labels)
        self.metadata.extend(metadata)
        self.next_id = max(self.next_id, int(ids.max()) + 1)
        self.n += m

    def _refresh(self) -> None:
        """Compute the norms of rows added since the last search (all rows when the centre
        moves: whenever the number of rows has doubled, amortised O(d) per row). Call with
        ``lock`` held."""
        n = self.n
        if self._ready == n:
            return
        start = self._ready
        if self.metric.centred and (self._centred_at == 0 or n >= 2 * self._centred_at):
            mean = self.vectors.sum(0, dtype=torch.float64) / n
            self._centre, self._centred_at = mean.float().to(self.device), n
            start = 0
        rows = self.vectors[start:n]
        if self.metric.uses_norms:
            norms = centred_sq_norms(rows, self._centre)
        else:
            norms = torch.zeros(n - start, dtype=torch.float32, device=rows.device)
        norms = norms.to(self.device)
        # All rows re-centred: a fresh tensor, as published snapshots read the old norms.
        self._norms = norms if start == 0 else _put(self._norms, start, norms)
        self._ready = n

    def remove(self, ids: Tensor) -> None:
        """Drop the rows with these ids (all known to be present), into fresh tensors."""
        with self.lock:
            self._refresh()
            self._remove(ids)
            self.version += 1
            self._published = None

    def _remove(self, ids: Tensor) -> None:
        keep = ~torch.isin(self.ids, ids.to(self.device))
        keep_cpu = keep.cpu()
        kv = keep.to(self._vector_device)
        self._vectors = self.vectors[kv].clone()
        if not self._alias:
            self._search = self._search[: self.n][keep].clone()
        self._norms = self._norms[: self.n][keep].clone()
        self._ids = self.ids[keep].clone()
        self._labels = self.labels[keep_cpu].clone()
        self._radius = self._radius[: self.n][keep_cpu].clone()
        self._eps = self._eps[: self.n][keep_cpu].clone()
        self.metadata = [m for m, k in zip(self.metadata, keep_cpu.tolist(), strict=True) if k]
        self.n = self._ready = int(keep_cpu.sum())
        if self.n == 0:
            self._centred_at = 0

    def to(self, device: torch.device) -> None:
        """Move the searched tensors (and, for float32 storage, the vectors) to ``device``."""
        with self.lock:
            self._refresh()
            self._move(device)
            self._published = None

    def _move(self, device: torch.device) -> None:
        self.device = device
        self._vectors = self.vectors.to(self._vector_device)
        self._search = self._search[: self.n].to(device)
        self._norms = self._norms[: self.n].to(device)
        self._ids = self.ids.to(device)
        self._centre = self._centre.to(device)
        self._radius = self._radius[: self.n]
        self._eps = self._eps[: self.n]
        self._labels = self.labels

    # -- search view -------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The current state, which no later change alters (built once per change)."""
        published = self._published
        if published is not None:
            return published
        with self.lock:
            if self._published is None:
                self._refresh()
                self._published = self._build()
            return self._published

    def _build(self) -> Snapshot:
        n = self.n
        c64 = self._centre.to(torch.float64)
        gallery = Gallery(
            search=self.vectors if self._alias else self._search[:n],
            norms=self._norms[:n],
            offset=-c64 if self._alias else torch.zeros_like(c64),
            centre=self._centre,
            vectors=self.vectors,
            ids=self.ids,
            eps_max=float(self._eps[:n].max()) if n else 0.0,
            norm_max=float(self._norms[:n].max()) if n else 0.0,
            radius_max=float(self._radius[:n].max()) if n else 0.0,
            metric=self.metric,
        )
        return Snapshot(self.version, gallery, self.labels, self.metadata)
