"""How a search is tuned: one frozen object instead of module globals.

Nothing here changes a result (every setting keeps the search exact); the settings trade speed
for memory or choose where the matrix product runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from featurescope.errors import EmbeddingIndexError

__all__ = ["BACKEND_NAMES", "SearchConfig"]

#: What :attr:`SearchConfig.backend` accepts.
BACKEND_NAMES = ("auto", "float32", "bfloat16", "numpy")


@dataclass(frozen=True)
class SearchConfig:
    """Tuning of :class:`~featurescope.EmbeddingIndex` searches; results never depend on it.

    Pass one to the index (``EmbeddingIndex(dim, config=SearchConfig(...))``, or to
    :meth:`~featurescope.EmbeddingIndex.load`); change one field with
    ``dataclasses.replace(config, gallery_tile=1024)``.

    Attributes:
        backend: the CPU matrix product of the fast pass. ``"auto"`` (default) times the
            float32 products (torch's, numpy's) against the bfloat16 one on a tile of the first
            large L2 search of each vector length and keeps the fastest (bfloat16 must win by
            :attr:`race_margin`); ``"float32"`` (torch's ``sgemm``) switches the race off;
            ``"bfloat16"`` skips the race for bfloat16 operands with float32 accumulation (fast
            on AMX or AVX-512-BF16 processors, slow elsewhere), used where it pays (see
            :attr:`min_queries_low_precision` and :attr:`min_rows_low_precision`; set both to 1
            to use it always) and for L2 only: other metrics multiply in float32;
            ``"numpy"`` uses numpy's OpenBLAS ``sgemm``, single-threaded on each worker (where
            that OpenBLAS lacks the batched entry point this needs, at its process-wide thread
            count, and the race leaves it out). GPUs always multiply in float32.
        threads: CPU worker threads a search may use; ``None`` (default) takes the caller's
            ``torch.get_num_threads()`` at each search. The workers' operations are
            single-threaded, set for each worker alone.
        streams: CUDA streams a GPU search deals its query tiles to.
        gallery_tile: fewest gallery rows per tile the CPU plan prefers.
        block_cells: floats per CPU score block (written by the product, read back from cache).
        merge_every: candidate blocks buffered per query before they are merged down.
        rerank_bytes: bytes of float64 candidates re-ranked at a time (cache-sized).
        min_queries_per_worker: fewest queries worth a worker thread of their own.
        min_rows_per_worker: fewest gallery rows worth a worker when few queries split the
            gallery instead.
        min_queries_low_precision: fewest queries for which a search makes the bfloat16 copy of
            a gallery (smaller searches use it only when it exists).
        min_rows_low_precision: fewest searched rows (after a ``where`` filter) for which the
            bfloat16 product may run.
        low_precision_extra: fewest candidates beyond ``k`` a query keeps in bfloat16 (its
            wider bound lets more rows tie).
        race_above: multiply-adds below which a search is not worth timing the backends for
            (it runs in float32 and leaves the choice to a larger one).
        race_margin: how many times faster the bfloat16 product must be to be chosen.

    Raises:
        EmbeddingIndexError: for an unknown backend or a setting that is not positive.

    Example:
        >>> import featurescope as fs
        >>> config = fs.index.SearchConfig(backend="float32", threads=2)
        >>> index = fs.EmbeddingIndex(4, config=config)
        >>> index.config.backend, index.config.gallery_tile
        ('float32', 4096)
    """

    backend: str = "auto"
    threads: int | None = None
    streams: int = 2
    gallery_tile: int = 4096
    block_cells: int = 2 * 2**20
    merge_every: int = 16
    rerank_bytes: int = 4 * 2**20
    min_queries_per_worker: int = 16
    min_rows_per_worker: int = 4096
    min_queries_low_precision: int = 256
    min_rows_low_precision: int = 2048
    low_precision_extra: int = 48
    race_above: float = 2e9
    race_margin: float = 1.25

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_NAMES:
            raise EmbeddingIndexError(
                f"backend must be one of {list(BACKEND_NAMES)}, got {self.backend!r}"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "backend" or (f.name == "threads" and value is None):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise EmbeddingIndexError(f"{f.name} must be a positive number, got {value!r}")
            if f.type in ("int", "int | None") and not isinstance(value, int):
                raise EmbeddingIndexError(f"{f.name} must be an int, got {value!r}")
