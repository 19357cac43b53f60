"""The answer of a nearest-neighbour search: distances and ids, plus the hits' labels and metadata."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

from torch import Tensor

from featurescope.errors import EmbeddingIndexError

__all__ = ["SearchResult"]


@dataclass(frozen=True)
class SearchResult:
    """Nearest neighbours of a batch of queries, nearest first.

    Unpacks and indexes like FAISS's ``index.search`` pair and ``torch.topk``'s named tuple:
    ``distances, ids = index.search(queries, k)``, ``result[0]`` is ``result.distances``,
    ``result[1]`` is ``result.ids`` and ``len(result) == 2``; the labels and metadata are extra
    attributes.

    Attributes:
        distances: ``[nq, k]`` float64, nearest first, by the index's ``metric``: for
            ``"l2"`` Euclidean (not squared) distances, ascending; for ``"cosine"`` cosine
            similarities and for ``"ip"`` inner products, both descending (largest first).
            Padding where fewer than ``k`` vectors could be returned (a ``where`` filter or
            ``exclude_ids`` left too few) is ``+inf`` for L2 and ``-inf`` for the others, as
            FAISS pads.
        ids: ``[nq, k]`` int64 ids of the hits; equal distances are ordered by id (smaller
            first); ``-1`` in the padding.
        labels: ``[nq, k]`` int64 labels of the hits, ``-1`` where a hit was added without one
            and in the padding.
        backend: the matrix product the fast pass ran (``"float32"``, ``"bfloat16"`` or
            ``"numpy"``, see :class:`SearchConfig`), or ``"float64"`` when every distance was
            computed exactly (``k`` near the number of vectors searched); ``""`` for results
            merged across ranks.
        version: the :attr:`EmbeddingIndex.version` of the state searched: every id, distance,
            label and metadata string comes from that one state, even while other threads add
            and remove (``None`` for results merged across ranks).

    Example:
        >>> import torch, featurescope as fs
        >>> index = fs.EmbeddingIndex(2)
        >>> index.add(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), labels=[7, 8], metadata=["a.png", "b.png"])
        >>> result = index.search(torch.tensor([[3.0, 3.0]]), k=2)
        >>> distances, ids = result
        >>> distances.tolist(), ids.tolist()
        ([[1.0, 4.242640687119285]], [[1, 0]])
        >>> result.labels.tolist(), result.metadata
        ([[8, 7]], [['b.png', 'a.png']])
        >>> len(result), result[1].tolist()
        (2, [[1, 0]])
    """

    distances: Tensor
    ids: Tensor
    labels: Tensor
    backend: str = ""
    _rows: Tensor | None = field(default=None, repr=False)
    _metadata: Sequence[str | None] | None = field(default=None, repr=False)
    version: int | None = None

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.distances, self.ids))

    def __len__(self) -> int:
        return 2

    @overload
    def __getitem__(self, item: int) -> Tensor: ...

    @overload
    def __getitem__(self, item: slice) -> tuple[Tensor, ...]: ...

    def __getitem__(self, item: int | slice) -> Tensor | tuple[Tensor, ...]:
        """``result[0]`` is :attr:`distances`, ``result[1]`` :attr:`ids` (as ``torch.topk``'s)."""
        return (self.distances, self.ids)[item]

    @property
    def metadata(self) -> list[list[str | None]]:
        """The hits' metadata strings (e.g. image paths), ``None`` where absent or padded.

        Raises:
            EmbeddingIndexError: for results merged across ranks, which carry no metadata.
        """
        if self._rows is None or self._metadata is None:
            raise EmbeddingIndexError(
                "this result carries no metadata (results merged across ranks only have ids "
                "and labels); look the ids up in the shard that holds them"
            )
        meta = self._metadata
        return [[meta[r] if r >= 0 else None for r in row] for row in self._rows.tolist()]
