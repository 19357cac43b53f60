"""Search images by their embeddings: an exact, memory-bounded nearest-neighbour index.

:class:`EmbeddingIndex` holds vectors (e.g. a network's last hidden layer) with ids, labels and
metadata such as image paths, and answers exact Euclidean k-nearest-neighbour queries: the ids
equal a float64 brute force's, ties going to the smaller id, even for duplicates and for data far
from the origin, where float32 ``‖x‖²+‖y‖²−2⟨x,y⟩`` (FAISS's flat index, ``torch.cdist``) fails.
:class:`ShardedEmbeddingIndex` spreads one index over ``torch.distributed`` ranks, and
:func:`retrieval_metrics` scores retrieval against labels. The index knows nothing of models.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from featurescope.errors import EmbeddingIndexError
from featurescope.index._checks import (
    RESERVED_IDS,
    as_exclusions,
    as_ids,
    as_labels,
    as_mask,
    as_metadata,
    as_vectors,
    as_vectors_and_norms,
    check_k,
)
from featurescope.index._mapped import MappedStore
from featurescope.index._result import SearchResult
from featurescope.index._search._config import SearchConfig
from featurescope.index._search._gallery import Gallery
from featurescope.index._search._metric import Metric, metric_named
from featurescope.index._search._plan import plan_tiles
from featurescope.index._search._schedule import search_exact
from featurescope.index._search._threads import on_worker
from featurescope.index._snapshot import Snapshot
from featurescope.index._store import Store

__all__ = ["EmbeddingIndex"]

_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class EmbeddingIndex:
    """Exact nearest-neighbour search (L2, cosine or inner product) over vectors with ids,
    labels and metadata.

    Searches run a matrix-product pass whose rounding error is bounded, then re-rank the
    few candidates the bound cannot separate in float64, so the ids returned are those of a
    float64 brute force with ties broken by the smaller id, whatever the ``metric``.
    Temporaries never exceed ``memory_budget`` bytes, whatever the number of queries and
    vectors. For L2 the product runs in float32, or in bfloat16 where the processor makes that
    clearly faster (AMX, AVX-512-BF16); an in-memory index then keeps a bfloat16 copy of its
    rows, half their float32 size (see the index guide, "Product backends"). Cosine and inner
    product searches multiply in float32.

    The index stores the float32 values of what is added; "exact" refers to those values.

    On the CPU a search of many queries splits them over worker threads of its own, and a
    search of few queries splits the gallery instead; each worker runs single-threaded
    operations, set for that worker alone (the caller's and other threads' torch and BLAS
    settings never change): on a machine shared with other work that keeps every core busy
    without stalling at parallel barriers. On a GPU, batches of queries go to CUDA streams.

    Args:
        dim: length of every vector.
        device: where the searched copy of the vectors lives (``"cpu"``, ``"cuda"``, ...).
        dtype: storage type of the searched copy: ``torch.float32`` (default), or
            ``torch.float16``/``torch.bfloat16`` to halve device memory; then the float32 vectors
            used for the exact re-rank stay on the CPU and the bound includes the storage
            rounding, so results stay exact.
        memory_budget: bytes the temporaries of one search may take (default 256 MiB).
        metric: ``"l2"`` (Euclidean distance, smallest first; default), ``"cosine"`` (cosine
            similarity, largest first; a zero vector has similarity 0 with everything) or
            ``"ip"`` (inner product, largest first). Saved with the index.
        config: tuning (worker threads, tile sizes, the product backend): a
            :class:`SearchConfig`; the default suits most machines. Not saved (it describes
            the machine, not the data): pass it to :meth:`load` again.

    Raises:
        EmbeddingIndexError: for a non-positive ``dim``, an unsupported ``dtype`` or
            ``metric``, or a budget too small for one query.

    Example:
        >>> import torch, featurescope as fs
        >>> index = fs.EmbeddingIndex(3)
        >>> index.add(torch.eye(3), labels=[0, 1, 1])
        >>> len(index)
        3
        >>> distances, ids = index.search(torch.tensor([[0.9, 0.1, 0.0]]), k=2)
        >>> ids.tolist()
        [[0, 1]]
        >>> cosine = fs.EmbeddingIndex(2, metric="cosine")
        >>> cosine.add(torch.tensor([[10.0, 0.0], [1.0, 1.0]]))
        >>> cosine.search(torch.tensor([[1.0, 0.2]]), k=2).distances.tolist()
        [[0.9805806751289282, 0.8320502959273969]]
    """

    def __init__(
        self,
        dim: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        memory_budget: int = 256 * 2**20,
        metric: str = "l2",
        config: SearchConfig | None = None,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise EmbeddingIndexError(f"dim must be a positive int, got {dim!r}")
        if dtype not in _STORAGE_DTYPES:
            raise EmbeddingIndexError(
                f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}"
            )
        if config is not None and not isinstance(config, SearchConfig):
            raise EmbeddingIndexError(
                f"config must be a featurescope.index.SearchConfig, got {type(config).__name__}"
            )
        self._config = SearchConfig() if config is None else config
        budget = int(memory_budget)
        try:
            plan_tiles(1, 1, dim, 32, budget, upcast=dtype != torch.float32, config=self._config)
        except ValueError as exc:
            raise EmbeddingIndexError(f"{exc}; raise memory_budget") from exc
        try:
            self._metric: Metric = metric_named(metric)
        except ValueError as exc:
            raise EmbeddingIndexError(f"{exc}; see the index guide, 'Choosing a metric'") from exc
        self._dim = dim
        self._dtype = dtype
        self._budget = budget
        self._store: Store | MappedStore = Store(
            dim, torch.device(device), dtype, budget, self._metric
        )

    # -- properties -------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Length of the vectors."""
        return self._dim

    @property
    def device(self) -> torch.device:
        """Device of the searched copy of the vectors."""
        return self._store.device

    @property
    def dtype(self) -> torch.dtype:
        """Storage type of the searched copy of the vectors."""
        return self._dtype

    @property
    def metric(self) -> str:
        """``"l2"``, ``"cosine"`` or ``"ip"``: what :meth:`search` ranks by."""
        return self._metric.name

    @property
    def config(self) -> SearchConfig:
        """The search tuning (see :class:`SearchConfig`)."""
        return self._config

    @property
    def memory_budget(self) -> int:
        """Bytes the temporaries of one search may take."""
        return self._budget

    @property
    def mapped(self) -> Path | None:
        """The file the vectors are memory-mapped from, or ``None`` for an index in memory."""
        return self._store.source if isinstance(self._store, MappedStore) else None

    @property
    def ids(self) -> Tensor:
        """The ids, in insertion order (a CPU copy)."""
        return self._store.snapshot().ids.cpu().clone()

    @property
    def labels(self) -> Tensor:
        """The labels, ``-1`` where none was given (a CPU copy)."""
        return self._store.snapshot().labels.clone()

    @property
    def metadata(self) -> list[str | None]:
        """The metadata strings, ``None`` where none was given (a copy)."""
        snap = self._store.snapshot()
        return list(snap.metadata[: snap.n])

    @property
    def vectors(self) -> Tensor:
        """The float32 vectors, in insertion order (a CPU copy)."""
        return self._store.snapshot().vectors.cpu().clone()

    @property
    def version(self) -> int:
        """A counter that every :meth:`add` and :meth:`remove` raises by one.

        A search reads one state of the index, the one :attr:`SearchResult.version` names
        (see the index guide, "Searching beside add and remove").
        """
        return self._store.version

    def __len__(self) -> int:
        return self._store.n

    def __repr__(self) -> str:
        return (
            f"EmbeddingIndex(dim={self._dim}, n={len(self)}, device={str(self.device)!r}, "
            f"dtype={self._dtype}, metric={self.metric!r})"
        )

    # -- mutation -----------------------------------------------------------------------------

    def add(
        self,
        vectors: Any,
        *,
        ids: Any = None,
        labels: Any = None,
        metadata: Sequence[str | None] | None = None,
    ) -> None:
        """Add vectors, with optional ids, integer labels and metadata strings.

        Everything is checked before anything changes: after an error the index is as before.

        Args:
            vectors: ``[n, dim]`` torch tensor or numpy array of real numbers.
            ids: ``n`` distinct integer ids, not already in the index; by default the next
                ``n`` integers after the largest id ever added (``0, 1, 2, ...`` from empty).
            labels: ``n`` integer labels ``>= 0`` (e.g. class indices).
            metadata: ``n`` strings, e.g. image paths.

        Raises:
            InputShapeError: if ``vectors`` is not ``[n, dim]`` or another argument is not ``n``
                long.
            EmbeddingIndexError: on NaN or infinity (naming the first bad row), a duplicate id
                (within the call or with the index), a negative label, or a value a float16
                index cannot store.
        """
        self._check_writable("add to")
        vecs, radius = as_vectors_and_norms(vectors, self._dim)
        n = vecs.shape[0]
        given = None if ids is None else as_ids(ids, n)
        labs = torch.full((n,), -1, dtype=torch.int64) if labels is None else as_labels(labels, n)
        meta = as_metadata(metadata, n)
        # Another thread's add between the id check and the append would let a clash in.
        with self._store.lock:
            store = self._store
            new_ids = given
            if new_ids is None:
                if store.next_id + n > RESERVED_IDS[1]:
                    raise EmbeddingIndexError(
                        f"automatic ids from {store.next_id} would reach {RESERVED_IDS[1]}, "
                        "which the index reserves; pass ids= explicitly"
                    )
                new_ids = torch.arange(store.next_id, store.next_id + n, dtype=torch.int64)
            self._check_new_ids(new_ids)
            if n:
                store.append(vecs, new_ids, labs, meta, radius)

    def _check_writable(self, what: str) -> None:
        if isinstance(self._store, MappedStore):
            raise EmbeddingIndexError(
                f"cannot {what} an index memory-mapped from {self._store.source} (its vectors "
                "stay on disk, read-only); load it with mmap=False to change it and save it "
                "again, or build a second index for the new vectors"
            )

    def _check_new_ids(self, new_ids: Tensor) -> None:
        if not len(self) or not new_ids.numel():
            return
        clash = torch.isin(new_ids.to(self._store.ids.device), self._store.ids)
        if bool(clash.any()):
            taken = new_ids[clash.cpu()][:5].tolist()
            raise EmbeddingIndexError(
                f"ids {taken} are already in the index; remove them first or pass other ids"
            )

    def remove(self, ids: Any) -> int:
        """Remove the vectors with these ids.

        Args:
            ids: integer ids, each in the index.

        Returns:
            The number of vectors removed.

        Raises:
            EmbeddingIndexError: if an id is not in the index (nothing is removed then).
        """
        self._check_writable("remove from")
        t = ids.detach().cpu() if isinstance(ids, Tensor) else torch.as_tensor(np.asarray(ids))
        unique = torch.unique(t.reshape(-1))
        req = as_ids(unique, unique.numel())
        with self._store.lock:
            present = torch.isin(req.to(self._store.ids.device), self._store.ids).cpu()
            if not bool(present.all()):
                missing = req[~present][:5].tolist()
                raise EmbeddingIndexError(f"ids {missing} are not in the index")
            self._store.remove(req)
        return int(req.numel())

    def to(self, device: str | torch.device) -> EmbeddingIndex:
        """Move the searched vectors to ``device``, in place; returns the index itself.

        Raises:
            EmbeddingIndexError: for a memory-mapped index and a device other than the CPU.
        """
        self._store.to(torch.device(device))
        return self

    # -- search -------------------------------------------------------------------------------

    @on_worker
    def search(
        self, queries: Any, k: int, *, where: Any = None, exclude_ids: Any = None
    ) -> SearchResult:
        """Find the ``k`` nearest vectors of each query, exactly.

        Args:
            queries: ``[nq, dim]`` torch tensor or numpy array.
            k: neighbours per query, ``1 <= k <= len(index)``.
            where: a boolean mask ``[len(index)]`` over the vectors in the order they were
                added (as :attr:`ids`): only those marked ``True`` are searched. Build one
                with :meth:`select` or by comparing, e.g. ``index.labels == 3``. The search
                skips the others (it never computes their distances).
            exclude_ids: ids to leave out per query: ``[nq]`` (one each, e.g. each query's own
                id when the queries are gallery vectors) or ``[nq, m]``.

        Returns:
            A :class:`SearchResult`; ``distances, ids = index.search(q, k)`` unpacks it. When
            ``where`` or ``exclude_ids`` leave fewer than ``k`` vectors, the rest of the row is
            padded with id ``-1`` and distance ``+inf``, as FAISS does.

        Raises:
            EmbeddingIndexError: on an empty index, a bad ``k``, a ``where`` that is not
                boolean, or NaN/infinity in a query.
            IndexFileError: for a memory-mapped index whose file was truncated or written
                to since it was opened.
            InputShapeError: on queries that are not ``[nq, dim]`` or a mask of the wrong
                length.

        Example:
            >>> import torch, featurescope as fs
            >>> index = fs.EmbeddingIndex(1)
            >>> index.add(torch.tensor([[0.0], [1.0], [2.0]]), labels=[0, 1, 1])
            >>> distances, ids = index.search(torch.tensor([[0.2]]), k=2, where=index.labels == 1)
            >>> ids.tolist()
            [[1, 2]]
            >>> index.search(torch.tensor([[0.2]]), k=2, where=index.select(ids=[2])).ids.tolist()
            [[2, -1]]
        """
        snap = self._store.snapshot()
        if not snap.n:
            raise EmbeddingIndexError("the index is empty; add vectors before searching")
        return self._search(snap, queries, k, where, exclude_ids)

    def _search(
        self, snap: Snapshot, queries: Any, k: int, where: Any, exclude_ids: Any
    ) -> SearchResult:
        q = as_vectors(queries, self._dim, "queries")
        excl = as_exclusions(exclude_ids, q.shape[0])
        k = check_k(k, snap.n)
        mask = None if where is None else as_mask(where, snap.n)
        extra = 0 if excl is None else excl.shape[1]
        gal = snap.gallery
        if mask is not None:
            gal = gal.restrict(mask.nonzero().flatten())
        k_search = min(gal.size, k + extra)
        dist, rows, backend = search_exact(
            gal, q.to(self.device), k_search, self._budget, self._config
        )
        if excl is not None:
            dist, rows = _drop_excluded(dist, rows, gal.ids, excl.to(rows.device), k)
        if dist.shape[1] < k:
            dist, rows = _pad(dist, rows, k)
        return _result(snap, self._metric.report(dist), rows, backend)

    def select(self, *, ids: Any = None, labels: Any = None) -> Tensor:
        """A ``where`` mask for :meth:`search`: the vectors with one of these ids and labels.

        Masks combine with ``&``, ``|`` and ``~``, so any filter of ids, labels or
        :attr:`metadata` is one expression away.

        Args:
            ids: ids to keep, each in the index.
            labels: labels to keep (vectors with any of them).

        Returns:
            A ``[len(index)]`` bool tensor, in the order of :attr:`ids`; with both arguments,
            the vectors that match both.

        Raises:
            EmbeddingIndexError: if an id is not in the index, or a value is not an integer.

        Example:
            >>> import torch, featurescope as fs
            >>> index = fs.EmbeddingIndex(1)
            >>> index.add(torch.zeros(4, 1), ids=[10, 11, 12, 13], labels=[0, 1, 0, 1])
            >>> index.select(labels=[1]).tolist()
            [False, True, False, True]
            >>> (index.select(ids=[10, 11]) & index.select(labels=[1])).tolist()
            [False, True, False, False]
        """
        snap = self._store.snapshot()
        keep = torch.ones(snap.n, dtype=torch.bool)
        if ids is not None:
            req = _unique_ints(ids, "ids")
            present = torch.isin(req, snap.ids.cpu())
            if not bool(present.all()):
                missing = req[~present][:5].tolist()
                raise EmbeddingIndexError(f"ids {missing} are not in the index")
            keep &= torch.isin(snap.ids.cpu(), req)
        if labels is not None:
            keep &= torch.isin(snap.labels, _unique_ints(labels, "labels"))
        return keep

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index to a ``.safetensors`` file, atomically; see :meth:`load`.

        Vectors, ids and labels are tensors; dim, dtype, metric, format version and metadata
        strings are JSON. Nothing is pickled.

        Returns:
            The path written.
        """
        from featurescope.index._persist import save_index

        return save_index(self, path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        memory_budget: int | None = None,
        mmap: bool = False,
        config: SearchConfig | None = None,
    ) -> EmbeddingIndex:
        """Read an index written by :meth:`save`, never unpickling anything.

        With ``mmap=True`` the vectors, ids and labels stay in the file, memory-mapped: a
        search streams them tile by tile, so galleries larger than RAM can be searched, and
        the process's own (anonymous) memory stays within ``memory_budget`` plus a small
        constant (and the metadata strings); the pages read belong to the operating system's
        file cache. Results equal those of the same index in memory. Opening reads the file
        once (checksum, validity, the centre and norm bounds). A mapped index is read-only:
        :meth:`add` and :meth:`remove` raise.

        Args:
            path: the file.
            device: where to put the searched vectors (the CPU only, with ``mmap=True``).
            memory_budget: overrides the saved budget.
            mmap: leave the vectors on disk (float32 indexes).
            config: the search tuning (see :class:`SearchConfig`; not saved with the index).

        Raises:
            IndexFileError: if the file is missing, truncated, corrupt or not an index, or
                ``mmap=True`` for a float16/bfloat16 index.

        Example:
            >>> import tempfile, torch, featurescope as fs
            >>> index = fs.EmbeddingIndex(2)
            >>> index.add(torch.ones(3, 2), ids=[5, 6, 7], metadata=["a", "b", "c"])
            >>> path = index.save(tempfile.mkdtemp() + "/index.safetensors")
            >>> again = fs.EmbeddingIndex.load(path)
            >>> again.ids.tolist(), again.metadata
            ([5, 6, 7], ['a', 'b', 'c'])
        """
        from featurescope.index._persist import load_index

        return load_index(
            cls, path, device=device, memory_budget=memory_budget, mmap=mmap, config=config
        )

    @classmethod
    def from_features(
        cls,
        folder: str | os.PathLike[str],
        node: str | None = None,
        *,
        mmap: bool = True,
        memory_budget: int = 256 * 2**20,
        metric: str = "l2",
        config: SearchConfig | None = None,
    ) -> EmbeddingIndex:
        """An index over one node of a folder written by ``FeatureTap.extract(out=...)``.

        The rows the extraction completed become the vectors (each sample's features
        flattened), the dataset indices (``sample_ids``) the ids, the labels and file paths
        (when the dataset gave them) the labels and metadata. With ``mmap=True`` (default) the
        vectors stay in the ``.npy`` file and are searched in place, as for
        :meth:`load` with ``mmap=True``; the index is then read-only.

        Args:
            folder: the extraction folder (one rank's folder for a distributed extraction).
            node: the alias of the node to index; may be left out when there is only one.
            mmap: search the float32 rows in place instead of copying them into memory.
            memory_budget: bytes the temporaries of one search may take.
            metric: ``"l2"``, ``"cosine"`` or ``"ip"`` (see :class:`EmbeddingIndex`).
            config: the search tuning (see :class:`SearchConfig`).

        Raises:
            EmbeddingIndexError: if the folder is not an extraction, or ``mmap=True`` and the
                node is not stored as float32.
            UnknownNameError: if ``node`` is not in the extraction.

        Example:
            >>> import json, pathlib, tempfile, numpy as np, featurescope as fs
            >>> out = pathlib.Path(tempfile.mkdtemp())
            >>> np.save(out / "fc7.npy", np.eye(3, dtype=np.float32))
            >>> manifest = {"format": "featurescope.features", "nodes": {"fc7": {"file": "fc7.npy"}},
            ...             "completed": 3, "sample_ids": [4, 5, 6], "labels": None, "paths": None}
            >>> _ = (out / "manifest.json").write_text(json.dumps(manifest))
            >>> index = fs.EmbeddingIndex.from_features(out)
            >>> index.search(np.float32([[0, 1, 0]]), k=1).ids.tolist()
            [[5]]
        """
        from featurescope.index._features import index_from_features

        return index_from_features(
            cls, folder, node, mmap=mmap, memory_budget=memory_budget, metric=metric, config=config
        )

    # -- used by the sharded index and persistence --------------------------------------------

    def _snapshot(self) -> Snapshot:
        return self._store.snapshot()

    def _gallery(self) -> Gallery:
        """What the kernel reads now (tests and benchmarks call the kernel with it)."""
        return self._store.snapshot().gallery

    def _key(self, distances: Tensor) -> Tensor:
        """Reported distances back to the ascending key results merge by."""
        return self._metric.key(distances)


def _result(snap: Snapshot, dist: Tensor, rows: Tensor, backend: str) -> SearchResult:
    """Ids, labels and metadata of the hits, all from the snapshot searched."""
    rows_cpu = rows.cpu()
    ids = torch.where(rows >= 0, snap.ids[rows.clamp(min=0)], -1)
    labels = torch.where(rows_cpu >= 0, snap.labels[rows_cpu.clamp(min=0)], -1)
    return SearchResult(
        dist, ids, labels.to(ids.device), backend, rows_cpu, snap.metadata, snap.version
    )


def _unique_ints(data: Any, what: str) -> Tensor:
    t = data.detach().cpu() if isinstance(data, Tensor) else torch.as_tensor(np.asarray(data))
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise EmbeddingIndexError(f"{what} must be integers, got dtype {t.dtype}")
    unique: Tensor = torch.unique(t.reshape(-1).to(torch.int64))
    return unique


def _pad(dist: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Pad rows to ``k`` columns with row ``-1`` at distance ``+inf``."""
    nq, m = dist.shape
    out_d = torch.full((nq, k), torch.inf, dtype=dist.dtype, device=dist.device)
    out_r = torch.full((nq, k), -1, dtype=rows.dtype, device=rows.device)
    out_d[:, :m], out_r[:, :m] = dist, rows
    return out_d, out_r


def _drop_excluded(
    dist: Tensor, rows: Tensor, ids: Tensor, excl: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Drop each row's excluded ids from its (k + m)-nearest list, keeping order; take k.

    Padding (row ``-1``) and excluded hits move to the end; what is left beyond the last kept
    hit becomes padding.
    """
    real = rows >= 0
    hit = (ids[rows.clamp(min=0)][:, :, None] == excl[:, None, :]).any(-1) | ~real
    order = hit.to(torch.int8).argsort(dim=1, stable=True)[:, :k]
    dist, rows, hit = dist.gather(1, order), rows.gather(1, order), hit.gather(1, order)
    return dist.masked_fill(hit, torch.inf), rows.masked_fill(hit, -1)
