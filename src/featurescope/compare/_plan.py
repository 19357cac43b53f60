"""Which images, in which batches, on which rank: fixed once, shared by both models and all ranks.

The minibatch estimator's value depends on which images share a batch, so the batches are cut
from one global order of the dataset (a DataLoader's sampler, drawn once on rank 0 and
broadcast), and under ``torch.distributed`` every rank takes whole batches, ``r, r + world,
...``, rather than a ``DistributedSampler``'s interleaved images. One rank or several then see
exactly the same batches, and the sums they add up are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from featurescope.compare._estimators import MIN_BATCH
from featurescope.errors import FeaturescopeError

__all__ = ["Plan", "dist_info", "plan_batches"]


def dist_info() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass
class Plan:
    """The global order of the images, cut into batches, and how to load them."""

    dataset: Dataset[Any]
    order: np.ndarray
    batch_size: int
    loader_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def batches(self) -> list[np.ndarray]:
        """Consecutive batches of ``batch_size``; a remainder under 4 joins the last batch."""
        cuts = list(range(0, len(self.order), self.batch_size))
        if len(cuts) > 1 and len(self.order) - cuts[-1] < MIN_BATCH:
            cuts.pop()
        return np.split(self.order, cuts[1:])

    def rank_batches(self, rank: int, world: int) -> list[np.ndarray]:
        """The batches rank ``rank`` of ``world`` computes: every ``world``-th, from ``rank``."""
        return self.batches[rank::world]

    def loader(self, batches: list[np.ndarray]) -> DataLoader[Any]:
        """A DataLoader that yields exactly ``batches``, in order."""
        return DataLoader(
            self.dataset, batch_sampler=[[int(i) for i in b] for b in batches], **self.loader_kwargs
        )


def plan_batches(
    data: Dataset[Any] | DataLoader[Any], batch_size: int, num_workers: int, rank: int, world: int
) -> Plan:
    """The plan for ``data``: a map-style dataset, or a batched DataLoader over one.

    Raises:
        FeaturescopeError: ``data`` is iterable-only, empty, split by a ``DistributedSampler``,
            or the batch size is not an integer of at least 4.
    """
    if isinstance(data, DataLoader):
        dataset = data.dataset
        if isinstance(dataset, IterableDataset) or data.batch_size is None:
            raise FeaturescopeError(
                "compare needs a batched DataLoader over a map-style dataset (with __len__ and "
                "__getitem__), so that both models see the same images"
            )
        if isinstance(data.sampler, DistributedSampler):
            raise FeaturescopeError(
                "compare splits the batches between ranks itself (whole batches, so that one "
                "rank or several give the same minibatch estimate); pass a DataLoader without "
                "a DistributedSampler, or the dataset"
            )
        # A shuffling sampler is drawn once, here (on rank 0 for every rank).
        order = np.fromiter((i for b in data.batch_sampler for i in b), dtype=np.int64)  # type: ignore[union-attr]
        if world > 1:
            shared = [order if rank == 0 else None]
            torch.distributed.broadcast_object_list(shared, src=0)
            order = np.asarray(shared[0], dtype=np.int64)
        kwargs: dict[str, Any] = {
            "collate_fn": data.collate_fn,
            "num_workers": data.num_workers,
            "pin_memory": data.pin_memory,
            "worker_init_fn": data.worker_init_fn,
        }
        plan = Plan(dataset, order, _check_batch_size(data.batch_size), kwargs)
    elif isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        raise FeaturescopeError(
            "compare needs a map-style Dataset (with __len__ and __getitem__) or a DataLoader "
            f"over one, got {type(data).__name__}"
        )
    else:
        order = np.arange(len(data), dtype=np.int64)
        plan = Plan(data, order, _check_batch_size(batch_size), {"num_workers": num_workers})
    if len(plan.order) < 2:
        raise FeaturescopeError(
            f"compare needs at least 2 images (linear CKA centres the features), got "
            f"{len(plan.order)}"
        )
    return plan


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < MIN_BATCH:
        raise FeaturescopeError(
            f"batch_size must be an integer of at least {MIN_BATCH}, got {batch_size!r}: the "
            f"unbiased minibatch HSIC divides by m(m-3) and (m-1)(m-2), so batches of 3 or "
            "fewer images have no estimate (use 32 or more for a steady one)"
        )
    return batch_size


def split_inputs(batch: Any) -> Any:
    """The model input of a collated batch: the batch itself, or the first of (image, label)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise FeaturescopeError(
        f"dataset items must be an image tensor or a tuple (image, label, ...); a batch came as "
        f"{type(batch).__name__}. Wrap the dataset so it returns one of those."
    )


Reduction = Callable[[torch.Tensor], torch.Tensor]


def _flatten(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1)


def _avgpool(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=tuple(range(2, t.dim()))) if t.dim() > 2 else t


#: How a node's output becomes one row per image.
REDUCTIONS: dict[str, Reduction] = {"flatten": _flatten, "avgpool": _avgpool}
