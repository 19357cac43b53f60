"""An index whose vectors stay on disk: memory-mapped rows searched tile by tile.

:class:`MappedStore` stands in for :class:`~featurescope.index._store.Store` when an index is
loaded with ``mmap=True`` or built from an extraction folder. Its vectors are a read-only
(copy-on-write) memory map of the file, so the pages a search reads belong to the page cache,
which the kernel reclaims, not to the process's anonymous memory. The per-row squared norms the
fast pass needs are recomputed tile by tile (``_search._gallery.centred_sq_norms``,
the same float32 values an in-memory index stores); only the centre and three maxima are kept,
found in one streaming pass when the store opens. Results equal an in-memory index's.

The store keeps the file open and compares its size, modification time and inode (one
``fstat``) before each search: a file truncated or rewritten in place since it was opened raises
:class:`~featurescope.errors.IndexFileError` instead of faulting (SIGBUS) on pages past its new end or
searching new bytes under the old checksum. A file *replaced* (a new file renamed onto the path)
does not matter: the map still holds the old one. Writing into the file while a search is reading
it is not detected and can still fault; do not.
"""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from featurescope.errors import EmbeddingIndexError, IndexFileError
from featurescope.index._search._gallery import MAX_NORM, NORM_CELLS, Gallery, centred_sq_norms
from featurescope.index._search._metric import METRICS, Metric
from featurescope.index._snapshot import Snapshot

__all__ = ["MappedStore", "map_rows"]

_CPU = torch.device("cpu")


def map_rows(array: np.ndarray) -> Tensor:
    """A torch view of a memory-mapped array (no copy; writes would stay private)."""
    return torch.from_numpy(array)


class MappedStore:
    """Rows of a memory-mapped index; see the module docstring.

    Args:
        vectors: ``[n, dim]`` float32 tensor over a memory map.
        ids: ``[n]`` int64 ids, distinct.
        labels: ``[n]`` int64 labels, ``-1`` where none.
        metadata: ``n`` strings or ``None``.
        source: the file mapped (for messages).
        budget: the index's memory budget.
        next_id: the next automatic id.
        metric: the index's metric.

    Raises:
        EmbeddingIndexError: if a row holds NaN, infinity or a norm too large to search, naming
            the row and the file.
    """

    dtype = torch.float32
    device = _CPU
    version = 0

    def __init__(
        self,
        vectors: Tensor,
        ids: Tensor,
        labels: Tensor,
        metadata: list[str | None],
        source: Path,
        budget: int,
        next_id: int,
        metric: Metric = METRICS["l2"],
    ) -> None:
        self.n, self.dim = vectors.shape
        self.budget = budget
        self.source = source
        self.metadata = metadata
        self.next_id = next_id
        self.metric = metric
        self.lock = threading.RLock()
        self._fd = os.open(source, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        self._stamp = _stamp(os.fstat(self._fd))
        self._vectors = vectors
        self._ids = ids
        self._labels = labels
        self._centre, self._norm_max, self._radius_max = self._scan()
        self._published = Snapshot(0, self._gallery(), labels, metadata)

    @property
    def vectors(self) -> Tensor:
        return self._vectors

    @property
    def ids(self) -> Tensor:
        return self._ids

    @property
    def labels(self) -> Tensor:
        return self._labels

    def _chunks(self) -> range:
        return range(0, self.n, max(1, NORM_CELLS // self.dim))

    def _scan(self) -> tuple[Tensor, float, float]:
        """Validate every row and find the centre, the largest squared norm and radius."""
        step = max(1, NORM_CELLS // self.dim)
        total = torch.zeros(self.dim, dtype=torch.float64)
        radius_max = 0.0
        for s in self._chunks():
            x64 = self._vectors[s : s + step].to(torch.float64)
            norms = torch.linalg.vector_norm(x64, dim=1)
            bad = ~torch.isfinite(norms) | (norms >= MAX_NORM)
            if bool(bad.any()):
                row = s + int(bad.nonzero()[0, 0])
                raise EmbeddingIndexError(
                    f"{self.source}: vector row {row} holds NaN or infinity, or has a norm "
                    f"above {MAX_NORM:.3g}; repair the file or load it with mmap=False"
                )
            total += x64.sum(0)
            radius_max = max(radius_max, float(norms.max()))
        if not self.metric.centred:
            return torch.zeros(self.dim), 0.0, radius_max
        centre = (total / max(self.n, 1)).float()
        norm_max = 0.0
        for s in self._chunks():
            norms32 = centred_sq_norms(self._vectors[s : s + step], centre)
            norm_max = max(norm_max, float(norms32.max()))
        return centre, norm_max, radius_max

    def _eps_max(self) -> float:
        """How far a tile's searched rows may be from the rows the metric wants."""
        if self.metric.searches_vectors:
            return 0.0
        # Unit rows divided in float64, then rounded once to float32 (at most 2⁻²⁴ each way).
        return 2.0**-24 * (1 + 2.0**-20) + self.metric.rows_pad(self.dim)

    def append(self, *args: object) -> None:
        raise AssertionError("EmbeddingIndex refuses to add to a mapped store")

    def remove(self, ids: Tensor) -> None:
        raise AssertionError("EmbeddingIndex refuses to remove from a mapped store")

    def to(self, device: torch.device) -> None:
        """Only the CPU: the vectors stay where the file is."""
        if device.type != "cpu":
            raise EmbeddingIndexError(
                f"an index memory-mapped from {self.source} searches on the CPU; load it "
                f"with mmap=False to move it to {device}"
            )

    def snapshot(self) -> Snapshot:
        """The rows, once the file is checked to be as it was when opened.

        Raises:
            IndexFileError: if the file was truncated or written to since it was opened.
        """
        now = _stamp(os.fstat(self._fd))
        if now != self._stamp:
            size, mtime_ns, _ = self._stamp
            raise IndexFileError(
                f"{self.source} changed on disk since it was opened (size {size} -> {now[0]} "
                f"bytes, mtime_ns {mtime_ns} -> {now[1]}); a memory-mapped index needs its "
                "file unchanged: load it again (and write new indexes to a new path, which "
                "save() does atomically)"
            )
        return self._published

    def _gallery(self) -> Gallery:
        """What a search needs; norms are recomputed per tile (``norms=None``)."""
        return Gallery(
            search=self._vectors,
            norms=None,
            offset=-self._centre.to(torch.float64),
            centre=self._centre,
            vectors=self._vectors,
            ids=self._ids,
            eps_max=self._eps_max(),
            norm_max=self._norm_max,
            radius_max=self._radius_max if self.metric.searches_vectors else 1.0 + 2.0**-20,
            metric=self.metric,
        )


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    """What changes when a file is truncated or written: size, mtime (ns), inode."""
    return st.st_size, st.st_mtime_ns, st.st_ino
