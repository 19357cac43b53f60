"""What a search reads from an index: the rows, their precomputed norms and bounds, and the
bfloat16 copy made for the bfloat16 product; tiles of it on demand."""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from featurescope.index._search._metric import METRICS, Metric, unit

__all__ = ["MAX_NORM", "NORM_CELLS", "Gallery", "centred_sq_norms", "rounding_error", "unit_rows"]

#: Vectors with a larger Euclidean norm would overflow the float32 pass.
MAX_NORM = 2.0**49
#: Float64 cells per chunk when squared norms are computed on the fly (1 MiB).
NORM_CELLS = 2**17
_U32 = 2.0**-24
#: Unit roundoff of bfloat16 (8-bit significand, round to nearest).
_U16 = 2.0**-8


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
        # A widening copy, then a float64 subtraction: the same values as one mixed-dtype
        # ``torch.sub``, which takes a slow unvectorised path (about twice the time).
        rel.copy_(x[s:e])
        rel.sub_(c64)
        out[s:e] = rel.square_().sum(1)
    return out


def unit_rows(x: Tensor) -> Tensor:
    """Float32 rows ``x / ‖x‖``, divided in float64 and rounded once (zero rows stay zero), in
    bounded chunks: a tile of a gallery left on disk as a cosine search reads it."""
    out = torch.empty_like(x, dtype=torch.float32)
    chunk = max(1, NORM_CELLS // max(1, x.shape[1]))
    for s in range(0, x.shape[0], chunk):
        out[s : s + chunk] = unit(x[s : s + chunk].to(torch.float64))
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

    Searches whose product runs in bfloat16 (see ``_backends``) read a bfloat16 copy of
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
