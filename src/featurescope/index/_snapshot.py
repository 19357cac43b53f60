"""One immutable state of an index: what a search reads, from its first tile to its answer.

``add`` and ``remove`` never change a published :class:`Snapshot`: they write rows past every
snapshot's end, or into fresh tensors, and publish a new snapshot under the store's lock. A
search takes the current snapshot once and reads only it, so its ids, distances, labels and
metadata all belong to that one state, whatever the writers do meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from featurescope.index._search._gallery import Gallery

__all__ = ["Snapshot"]


@dataclass(frozen=True)
class Snapshot:
    """The rows of an index at one :attr:`version`.

    Attributes:
        version: the index's :attr:`~featurescope.EmbeddingIndex.version` when published.
        gallery: what the kernel reads (rows, norms, centre, ids, bounds).
        labels: ``[n]`` int64 labels, on the CPU.
        metadata: at least ``n`` entries; only the first ``n`` are this snapshot's (the store
            appends to the same list, so taking a snapshot copies nothing).
    """

    version: int
    gallery: Gallery
    labels: Tensor
    metadata: Sequence[str | None]

    @property
    def n(self) -> int:
        """The number of rows."""
        return int(self.gallery.ids.shape[0])

    @property
    def ids(self) -> Tensor:
        """``[n]`` int64 ids, on the index's device."""
        return self.gallery.ids

    @property
    def vectors(self) -> Tensor:
        """``[n, dim]`` float32 vectors."""
        return self.gallery.vectors
