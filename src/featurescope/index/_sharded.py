"""One index spread over ``torch.distributed`` ranks: each holds a shard, searches merge."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from featurescope.errors import EmbeddingIndexError
from featurescope.index._checks import as_vectors, check_k
from featurescope.index._result import SearchResult
from featurescope.index._search._merge import lex_smallest

if TYPE_CHECKING:
    from featurescope.index._embedding import EmbeddingIndex

__all__ = ["ShardedEmbeddingIndex"]

_INT64_MAX = torch.iinfo(torch.int64).max


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

    def __len__(self) -> int:
        """The number of vectors over all shards (a collective call)."""
        import torch.distributed as dist

        n = torch.tensor([len(self.local_index)], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(n, group=self.group)
        return int(n.item())

    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        backend = dist.get_backend(self.group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def search(self, queries: Any, k: int) -> SearchResult:
        """Exact k nearest neighbours over all shards; a collective call with equal arguments.

        Returns:
            A :class:`SearchResult` with distances, ids and labels (no metadata, which stays
            with the shard that holds it).

        Raises:
            EmbeddingIndexError: if ``k`` exceeds the vectors of all shards together.
        """
        import torch.distributed as dist

        local = self.local_index
        q = as_vectors(queries, local.dim, "queries")
        k = check_k(k, len(self))
        nq = q.shape[0]
        kl = min(k, len(local))
        dev = self._comm_device()
        dist_pad = torch.full((nq, k), torch.inf, dtype=torch.float64, device=dev)
        ids_pad = torch.full((nq, k), _INT64_MAX, dtype=torch.int64, device=dev)
        lab_pad = torch.full((nq, k), -1, dtype=torch.int64, device=dev)
        if kl:
            found = local.search(q, kl)
            # Merged by the ascending key (similarities negated), as one index would order them.
            dist_pad[:, :kl] = local._key(found.distances).to(dev)
            ids_pad[:, :kl] = found.ids.to(dev)
            lab_pad[:, :kl] = found.labels.to(dev)
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
