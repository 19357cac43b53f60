"""FeatureTap over a whole dataset: batches in inference mode, in memory or streamed to disk.

The order of the samples is fixed before the first batch (the dataset's order, a DataLoader's
sampler drawn once, or this rank's part under ``torch.distributed``), so every row carries its
dataset index, and an extraction to disk can be resumed in the same order. See
:mod:`featurescope.tap._store` for the files written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from featurescope._torch_utils import model_device, weights_fingerprint
from featurescope.errors import FeaturescopeError, PluginError, did_you_mean
from featurescope.tap._store import Extraction, ShardWriter, load_features, merge_features

if TYPE_CHECKING:
    from featurescope.tap._tap import FeatureTap

__all__ = ["Reduce", "extract"]

Reduce = str | Callable[[torch.Tensor], torch.Tensor] | None


def _avgpool(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=tuple(range(2, t.dim()))) if t.dim() > 2 else t


def _flatten(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1) if t.dim() > 2 else t


_REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "avgpool": _avgpool,
    "flatten": _flatten,
}


def _reduction(reduce: Reduce) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str | None]:
    if reduce is None:
        return None, None
    if isinstance(reduce, str):
        if reduce not in _REDUCTIONS:
            raise FeaturescopeError(
                f"unknown reduce {reduce!r}.{did_you_mean(reduce, _REDUCTIONS)} Use None, "
                f"{', '.join(repr(r) for r in _REDUCTIONS)} or a callable tensor -> tensor."
            )
        return _REDUCTIONS[reduce], reduce
    if callable(reduce):
        name = getattr(reduce, "__qualname__", type(reduce).__qualname__)
        return reduce, f"callable:{getattr(reduce, '__module__', '')}.{name}"
    raise FeaturescopeError(
        f"reduce must be None, a name or a callable, got {type(reduce).__name__}"
    )


class _Indexed(Dataset[tuple[int, Any]]):
    """Yields ``(index, item)`` so every row of the output knows which sample it is."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class _IndexedCollate:
    """Collates ``(index, item)`` pairs with the user's collate function for the items."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, batch: list[tuple[int, Any]]) -> tuple[torch.Tensor, Any]:
        ids = torch.tensor([i for i, _ in batch], dtype=torch.int64)
        return ids, self.collate([item for _, item in batch])


@dataclass
class _Plan:
    """Which samples to extract, in which order, and how to load them."""

    dataset: Dataset[Any]
    ids: np.ndarray
    batch_size: int
    loader_kwargs: dict[str, Any]

    def loader(self, ids: np.ndarray) -> DataLoader[Any]:
        from torch.utils.data import default_collate

        kwargs = dict(self.loader_kwargs)
        collate = kwargs.pop("collate_fn", None) or default_collate
        return DataLoader(
            _Indexed(self.dataset),
            batch_size=self.batch_size,
            sampler=[int(i) for i in ids],
            collate_fn=_IndexedCollate(collate),
            **kwargs,
        )


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _distributed_part(sampler: DistributedSampler[Any], n: int) -> np.ndarray:
    ids = np.fromiter(iter(sampler), dtype=np.int64)
    if sampler.drop_last:
        return ids
    # Without drop_last the sampler pads the ranks' parts to equal length by repeating samples
    # at the end of each part; a feature file wants each sample once.
    return ids[: len(range(sampler.rank, n, sampler.num_replicas))]


def _plan(
    data: Dataset[Any] | DataLoader[Any], batch_size: int, num_workers: int, rank: int, world: int
) -> _Plan:
    plan = _plan_order(data, batch_size, num_workers, rank, world)
    if len(plan.dataset) == 0:  # type: ignore[arg-type]
        raise FeaturescopeError("the dataset is empty; there is nothing to extract")
    return plan


def _plan_order(
    data: Dataset[Any] | DataLoader[Any], batch_size: int, num_workers: int, rank: int, world: int
) -> _Plan:
    if isinstance(data, DataLoader):
        dataset = data.dataset
        if isinstance(dataset, IterableDataset) or data.batch_size is None:
            raise FeaturescopeError(
                "extract needs a batched DataLoader over a map-style dataset (with __len__ and "
                "__getitem__), so that every row can be traced to its sample"
            )
        n = len(dataset)  # type: ignore[arg-type]
        if isinstance(data.sampler, DistributedSampler):
            ids = _distributed_part(data.sampler, n)
        else:
            # A shuffling sampler is drawn once, here; the run (and a resume) follows that draw.
            ids = np.fromiter((i for batch in data.batch_sampler for i in batch), dtype=np.int64)  # type: ignore[union-attr]
            if world > 1:
                # Every rank must split the same draw: rank 0's.
                shared = [ids if rank == 0 else None]
                torch.distributed.broadcast_object_list(shared, src=0)
                ids = np.asarray(shared[0])[rank::world]
        kwargs: dict[str, Any] = {
            "collate_fn": data.collate_fn,
            "num_workers": data.num_workers,
            "pin_memory": data.pin_memory,
            "timeout": data.timeout,
            "worker_init_fn": data.worker_init_fn,
            "multiprocessing_context": data.multiprocessing_context,
        }
        if data.num_workers > 0:
            kwargs["prefetch_factor"] = data.prefetch_factor
            kwargs["persistent_workers"] = data.persistent_workers
        return _Plan(dataset, ids, int(data.batch_size), kwargs)
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        raise FeaturescopeError(
            "extract needs a map-style Dataset (with __len__ and __getitem__) or a DataLoader "
            f"over one, got {type(data).__name__}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise FeaturescopeError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = len(data)
    if world > 1:
        ids = _distributed_part(DistributedSampler(data, world, rank, shuffle=False), n)
    else:
        ids = np.arange(n, dtype=np.int64)
    return _Plan(data, ids, batch_size, {"num_workers": num_workers})


def _paths(dataset: Dataset[Any], ids: np.ndarray) -> list[str] | None:
    samples = getattr(dataset, "samples", None)
    if samples is None:
        samples = getattr(dataset, "imgs", None)
    if not isinstance(samples, Sequence) or len(samples) != len(dataset):  # type: ignore[arg-type]
        return None
    try:
        return [os.fspath(samples[int(i)][0]) for i in ids]
    except (TypeError, IndexError, KeyError):
        return None


def _hash_item(digest: Any, item: Any) -> None:
    """Feed one dataset item (tensors, arrays, images, numbers, nested) into ``digest``."""
    if isinstance(item, torch.Tensor):
        array = item.detach().cpu().contiguous()
        if array.dtype == torch.bfloat16:  # NumPy has no bfloat16: its bits, as int16
            array = array.view(torch.int16)
        item = array.numpy()
    if isinstance(item, np.ndarray):
        digest.update(f"{item.dtype}{item.shape}".encode())
        digest.update(np.ascontiguousarray(item).tobytes())
    elif isinstance(item, (tuple, list)):
        for part in item:
            _hash_item(digest, part)
    elif isinstance(item, Mapping):
        for key in sorted(item, key=str):
            digest.update(str(key).encode("utf-8", "surrogateescape"))
            _hash_item(digest, item[key])
    elif hasattr(item, "tobytes") and hasattr(item, "size"):  # a PIL image
        digest.update(f"{getattr(item, 'mode', '')}{item.size}".encode())
        digest.update(item.tobytes())
    else:
        digest.update(repr(item).encode("utf-8", "surrogateescape"))


def data_fingerprint(dataset: Dataset[Any], ids: np.ndarray, paths: list[str] | None) -> str:
    """What a resumed extraction checks it is resuming onto: the same data, not only as much.

    With files (an :class:`~featurescope.data.ImageFolder`'s ``samples``) it is every sample's
    id, file name and size, in id order (a shuffling loader draws another order each run):
    no file is read. Without files it is the content of one sample, the lowest id, read once.

    Example:
        >>> import numpy as np, torch
        >>> data = [torch.zeros(2), torch.ones(2)]
        >>> same = data_fingerprint(data, np.arange(2), None)
        >>> same == data_fingerprint([torch.zeros(2), torch.ones(2)], np.arange(2), None)
        True
        >>> same == data_fingerprint([torch.ones(2), torch.ones(2)], np.arange(2), None)
        False
    """
    digest = hashlib.sha256(f"{len(ids)} samples\n".encode())
    if paths is not None:
        for i, path in sorted(zip((int(i) for i in ids), paths, strict=True)):
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1  # a file gone since: the names still tell most apart
            digest.update(f"{i}\0{path}\0{size}\n".encode("utf-8", "surrogateescape"))
    elif len(ids):
        _hash_item(digest, dataset[int(ids.min())])
    return digest.hexdigest()[:16]


def _split(batch: Any) -> tuple[Any, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        labels = batch[1] if len(batch) > 1 else None
        if isinstance(labels, torch.Tensor) and labels.dim() == 1:
            return batch[0], labels
        return batch[0], None
    raise FeaturescopeError(
        f"dataset items must be an image tensor or a tuple (image, label, ...); a batch came as "
        f"{type(batch).__name__}. Wrap the dataset so it returns one of those."
    )


def _to_numpy(alias: str, value: Any) -> np.ndarray:
    if not isinstance(value, torch.Tensor):
        raise FeaturescopeError(
            f"node {alias!r} returns {type(value).__name__}, not a tensor; pass reduce=callable "
            "that turns it into one"
        )
    if value.dtype == torch.bfloat16:  # NumPy has no bfloat16
        value = value.float()
    array: np.ndarray = value.detach().cpu().numpy()
    return array


class _MemorySink:
    """Collects an extraction in arrays allocated once, at the size of the whole plan."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.completed = 0
        self.features: dict[str, np.ndarray] = {}
        self.labels: np.ndarray | None = None

    def write(self, arrays: dict[str, np.ndarray], labels: np.ndarray | None) -> None:
        if not self.features:
            self.features = {
                a: np.empty((self.n, *b.shape[1:]), dtype=b.dtype) for a, b in arrays.items()
            }
            if labels is not None:
                self.labels = np.empty(self.n, dtype=labels.dtype)
        start = self.completed
        stop = start + len(next(iter(arrays.values())))
        for alias, batch in arrays.items():
            self.features[alias][start:stop] = batch
        if self.labels is not None and labels is not None:
            self.labels[start:stop] = labels
        self.completed = stop


def _target_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """Where a pass over the data runs: ``device``, else the model's, else the CPU.

    Raises:
        FeaturescopeError: the model is on another device than ``device``.
    """
    on = model_device(model)
    target = torch.device(device) if device is not None else (on or torch.device("cpu"))
    # "cuda" means the current CUDA device: it matches "cuda:0" when that is current.
    if on is not None and not (
        on.type == target.type
        and (on.index is None or target.index is None or on.index == target.index)
    ):
        raise FeaturescopeError(
            f"the model is on {on}, not on {target}; move it first: model.to({str(target)!r})"
        )
    return target


def _describe_model(model: torch.nn.Module) -> tuple[str, dict[str, Any] | None]:
    from featurescope.zoo.metadata import model_metadata

    meta = model_metadata(model)
    if meta is None:
        return type(model).__name__, None
    return meta.architecture, meta.preprocessing.to_dict() if meta.preprocessing else None


def extract(
    tap: FeatureTap,
    data: Dataset[Any] | DataLoader[Any],
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    reduce: Reduce = None,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    num_workers: int = 0,
    overwrite: bool = False,
) -> Extraction:
    """Run ``tap`` over ``data``; see :meth:`featurescope.FeatureTap.extract` for the arguments.

    Under ``torch.distributed`` each rank extracts its ``DistributedSampler`` part; with ``out``
    it writes ``out/rank{r}/`` and rank 0 merges the manifests once every rank is done.
    After the extraction the ``featurescope_features_extracted`` hook is called.

    Raises:
        FeaturescopeError: the model is not on ``device``, ``reduce`` is unknown, the data is not
            a map-style dataset, or ``out`` holds a different extraction.
    """

    reduce_fn, reduce_name = _reduction(reduce)
    rank, world = _dist()
    plan = _plan(data, batch_size, num_workers, rank, world)
    target = _target_device(tap.model, device)
    model_name, preprocessing = _describe_model(tap.model)
    nodes = tap.nodes
    paths = _paths(plan.dataset, plan.ids)
    header = {
        "model": model_name,
        "preprocessing": preprocessing,
        # Resume only onto rows from these very weights: after more training the same model
        # name gives other features, and mixing the two would be silent.
        "weights": weights_fingerprint(tap.model),
        "nodes": nodes,
        # ... and only onto the same data: as many samples is not enough (on disk only: an
        # extraction in memory resumes nothing).
        "data": data_fingerprint(plan.dataset, plan.ids, paths) if out is not None else None,
        "reduce": reduce_name,
        "rank": rank,
        "world_size": world,
    }
    writer: ShardWriter | None = None
    sink: _MemorySink | None = None
    if out is not None:
        folder = Path(out) / f"rank{rank}" if world > 1 else Path(out)
        writer = ShardWriter(folder, header, plan.ids, paths, overwrite)
        ids, paths, start = writer.sample_ids, writer.paths, writer.completed
    else:
        ids, start = plan.ids, 0
        sink = _MemorySink(len(ids))
    if writer is None or not writer.done:
        _run(
            tap,
            plan.loader(ids[start:]),
            target,
            reduce_fn,
            writer,
            sink,
            total=len(ids),
            initial=start,
            progress=progress and rank == 0,
        )
    if writer is not None:
        writer.commit()
        result = load_features(writer.folder)
    else:
        assert sink is not None
        result = Extraction(sink.features, ids, sink.labels, paths, None, None, dict(nodes))
    _call_hook(result, header, out)
    if writer is not None and world > 1:
        torch.distributed.barrier()
        if rank == 0:
            merge_features(Path(out))  # type: ignore[arg-type]
        torch.distributed.barrier()
    return result


def _run(
    tap: FeatureTap,
    loader: DataLoader[Any],
    device: torch.device,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    writer: ShardWriter | None,
    sink: _MemorySink | None,
    *,
    total: int,
    initial: int,
    progress: bool,
) -> None:
    from featurescope._progress import progress as progress_bar

    non_blocking = device.type == "cuda"
    with (
        progress_bar(total, "extract", unit="img", initial=initial, enabled=progress) as bar,
        torch.inference_mode(),
    ):
        for _ids, batch in loader:
            inputs, labels = _split(batch)
            if isinstance(inputs, torch.Tensor):
                inputs = inputs.to(device, non_blocking=non_blocking)
            features = tap(inputs)
            if reduce_fn is not None:
                features = {alias: reduce_fn(value) for alias, value in features.items()}
            arrays = {alias: _to_numpy(alias, value) for alias, value in features.items()}
            label_array = labels.numpy() if labels is not None else None
            if writer is not None:
                writer.write(arrays, label_array)
            elif sink is not None:
                sink.write(arrays, label_array)
            bar.update(len(_ids))


def _call_hook(result: Extraction, header: dict[str, Any], out: Any) -> None:
    from featurescope.plugins import get_plugin_manager, hook_failed

    info = {
        "model": header["model"],
        "nodes": dict(header["nodes"]),
        "num_samples": len(result.sample_ids),
        "reduce": header["reduce"],
        "out": os.fspath(out) if out is not None else None,
        "labels": result.labels,
        "sample_ids": result.sample_ids,
        "paths": result.paths,
        "rank": header["rank"],
        "world_size": header["world_size"],
    }
    hook = get_plugin_manager().hook.featurescope_features_extracted
    try:
        hook(features=result.features, info=info)
    except PluginError:
        raise  # a plugin that called featurescope, which hit another plugin: already named
    except (Exception, SystemExit) as exc:  # a plugin's sys.exit() must not end the program
        raise hook_failed(hook, exc) from exc
