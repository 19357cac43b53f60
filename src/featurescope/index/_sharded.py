"""One index spread over ``torch.distributed`` ranks: each holds a shard, searches merge."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from featurescope.errors import EmbeddingIndexError, FeaturescopeError
from featurescope.index._checks import as_vectors, check_k
from featurescope.index._result import SearchResult
from featurescope.index._search._merge import lex_smallest

if TYPE_CHECKING:
    from featurescope.index._embedding import EmbeddingIndex

__all__ = ["ShardedEmbeddingIndex"]

_INT64_MAX = torch.iinfo(torch.int64).max
_METRIC_CODES = {"l2": 0, "cosine": 1, "ip": 2}
#: Columns of the contract row every rank must agree on, and what they are.
_CONTRACT = {1: "k", 2: "number of queries", 3: "dimension", 4: "metric", 7: "queries"}


class ShardedEmbeddingIndex:
    """Search the union of the :class:`EmbeddingIndex` shards held by the ranks of a group.

    Each rank adds its share of the vectors, with ids that are unique across ranks (global
    ids), to its own ``local_index``. :meth:`search` must then be called on every rank with the
    same queries and ``k``; each rank searches its shard, the shards' top-k lists are gathered,
    and every rank gets exactly what one index holding all shards would return: the same ids,
    distances and labels, ties broken by the smaller id.

    Args:
        local_index: this rank's shard (may be empty).
        group: the process group; the default group when ``None``.

    Raises:
        EmbeddingIndexError: if ``torch.distributed`` is not initialised.

    Example:
        On each of two ranks after ``torch.distributed.init_process_group("gloo")``::

            local = fs.EmbeddingIndex(256)
            local.add(my_vectors, ids=my_global_ids, labels=my_labels)
            sharded = fs.index.ShardedEmbeddingIndex(local)
            distances, ids = sharded.search(queries, k=10)  # identical on every rank
    """

    def __init__(self, local_index: EmbeddingIndex, group: Any = None) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise EmbeddingIndexError(
                "ShardedEmbeddingIndex needs torch.distributed.init_process_group() first"
            )
        self.local_index = local_index
        self.group = group
        self._checked: tuple[int, ...] | None = None  # shard versions whose ids were checked

    def __len__(self) -> int:
        """The number of vectors over all shards (a collective call)."""
        import torch.distributed as dist

        n = torch.tensor([len(self.local_index)], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(n, group=self.group)
        return int(n.item())

    def _agree(self, queries: Any, k: Any) -> tuple[Tensor, int]:
        """Check the call's contract across ranks (one small all-gather); see :meth:`search`.

        Returns:
            The validated queries and ``k``.
        """
        local = self.local_index
        problem = ""
        q = torch.empty(0, local.dim)
        try:
            q = as_vectors(queries, local.dim, "queries")
            k = check_k(k, _INT64_MAX)
        except FeaturescopeError as exc:
            problem = str(exc)
        fingerprint = int.from_bytes(hashlib.sha256(q.numpy().tobytes()).digest()[:7], "little")
        mine = [
            int(not problem),
            int(k) if not problem else -1,
            q.shape[0],
            local.dim,
            _METRIC_CODES[local.metric],
            len(local),
            local.version,
            fingerprint,
        ]
        rows = self._all_gather(torch.tensor(mine, dtype=torch.int64))
        table = rows.reshape(-1, len(mine)).tolist()
        failed = [r for r, row in enumerate(table) if not row[0]]
        if failed:
            here = f": {problem}" if problem else ""
            raise EmbeddingIndexError(
                f"ShardedEmbeddingIndex.search: rank(s) {failed} refused their arguments{here}"
            )
        for column, what in _CONTRACT.items():
            values = [row[column] for row in table]
            if len(set(values)) > 1:
                shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                if column == 7:
                    shown = "their values differ"
                raise EmbeddingIndexError(
                    f"ShardedEmbeddingIndex.search needs the same {what} on every rank ({shown})"
                )
        versions = tuple(row[6] for row in table)
        if versions != self._checked:
            self._check_disjoint([row[5] for row in table])
            self._checked = versions
        return q, check_k(k, sum(row[5] for row in table))

    def _check_disjoint(self, sizes: list[int]) -> None:
        """Every id in one shard only (a collective; run when a shard has changed)."""
        width = max(sizes)
        if width == 0:
            return
        ids = torch.full((width,), _INT64_MAX, dtype=torch.int64)
        ids[: sizes[self._rank()]] = self.local_index.ids
        everyone = self._all_gather(ids).reshape(len(sizes), width)
        owner = torch.arange(len(sizes)).repeat_interleave(width).reshape(len(sizes), width)
        real = everyone != _INT64_MAX
        values, counts = torch.unique(everyone[real], return_counts=True)
        if bool((counts > 1).any()):
            dup = values[counts > 1][:5]
            where = {int(i): sorted(set(owner[real][everyone[real] == i].tolist())) for i in dup}
            raise EmbeddingIndexError(
                f"ShardedEmbeddingIndex: ids {list(where)} are in more than one shard (ranks "
                f"{list(where.values())}); give every vector one global id"
            )

    def _rank(self) -> int:
        import torch.distributed as dist

        return int(dist.get_rank(self.group))

    def _all_gather(self, t: Tensor) -> Tensor:
        """Every rank's ``t`` (equal shapes), concatenated in rank order, on the CPU."""
        import torch.distributed as dist

        dev = self._comm_device()
        parts = [torch.empty_like(t, device=dev) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, t.to(dev), group=self.group)
        return torch.cat(parts).cpu()

    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        backend = dist.get_backend(self.group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def search(self, queries: Any, k: int) -> SearchResult:
        """Exact k nearest neighbours over all shards; a collective call with equal arguments.

        The ranks first exchange what they were asked (``k``, the queries' count, dimension
        and a hash of their values, the metric) and, when a shard changed since the last
        search, their ids; any disagreement, or an argument one rank refuses, makes every rank
        raise the same error instead of returning a wrong merge or waiting forever.

        Returns:
            A :class:`SearchResult` with distances, ids and labels (no metadata, which stays
            with the shard that holds it).

        Raises:
            EmbeddingIndexError: on every rank, if the ranks were given different ``k``,
                queries or metrics, if two shards hold the same id, if one rank's arguments are
                invalid (that rank says why), or if ``k`` exceeds the vectors of all shards.
        """
        import torch.distributed as dist

        local = self.local_index
        q, k = self._agree(queries, k)
        nq = q.shape[0]
        kl = min(k, len(local))
        dev = self._comm_device()
        dist_pad = torch.full((nq, k), torch.inf, dtype=torch.float64, device=dev)
        ids_pad = torch.full((nq, k), _INT64_MAX, dtype=torch.int64, device=dev)
        lab_pad = torch.full((nq, k), -1, dtype=torch.int64, device=dev)
        failure = ""
        try:
            if kl:
                found = local.search(q, kl)
                # Merged by the ascending key (similarities negated), as one index orders them.
                dist_pad[:, :kl] = local._key(found.distances).to(dev)
                ids_pad[:, :kl] = found.ids.to(dev)
                lab_pad[:, :kl] = found.labels.to(dev)
        except FeaturescopeError as exc:
            failure = str(exc)
        # One rank's failure (a mapped shard's file changed, ...) stops every rank here.
        status = self._all_gather(torch.tensor([int(bool(failure))]))
        if bool(status.any()):
            failed = status.nonzero().flatten().tolist()
            here = f": {failure}" if failure else ""
            raise EmbeddingIndexError(
                f"ShardedEmbeddingIndex.search failed on rank(s) {failed}{here}"
            )
        world = dist.get_world_size(self.group)
        gathered = []
        for t in (dist_pad, ids_pad, lab_pad):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t, group=self.group)
            gathered.append(torch.cat(parts, 1).cpu())
        d_all, i_all, l_all = gathered
        order = lex_smallest(d_all, i_all, k)
        out_dev = local.device
        return SearchResult(
            local._metric.report(d_all.gather(1, order)).to(out_dev),
            i_all.gather(1, order).to(out_dev),
            l_all.gather(1, order).to(out_dev),
        )
