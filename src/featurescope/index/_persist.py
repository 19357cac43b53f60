"""Saving and loading an :class:`~featurescope.EmbeddingIndex`: safetensors plus JSON, no pickle.

One ``.safetensors`` file holds ``vectors`` (float32), ``ids`` and ``labels`` (int64) and the
metadata strings as UTF-8 JSON bytes (``metadata``, uint8); its header carries the format tag,
a JSON ``config`` (dim, dtype, memory budget, next automatic id) and a SHA-256 of the tensors,
so a truncated, altered or foreign file is refused with :class:`~featurescope.IndexFileError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from featurescope._io import atomic_path
from featurescope._version import __version__
from featurescope.errors import FeaturescopeError, IndexFileError
from featurescope.index._checks import as_ids, as_vectors_and_norms

if TYPE_CHECKING:
    from featurescope.index._embedding import EmbeddingIndex
    from featurescope.index._search._config import SearchConfig

__all__ = ["FORMAT", "load_index", "save_index"]

FORMAT = "featurescope-index/1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HASH_CHUNK = 16 * 2**20
_ST_DTYPES = {"F32": np.float32, "I64": np.int64, "U8": np.uint8}
_TENSORS = {
    "vectors": torch.float32,
    "ids": torch.int64,
    "labels": torch.int64,
    "metadata": torch.uint8,
}


def _digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of the tensors' names, shapes and bytes, read in place (memory maps stay paged)."""
    h = hashlib.sha256()
    for name in _TENSORS:
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(repr(tuple(t.shape)).encode())
        if t.numel():
            flat = t.reshape(-1).view(torch.uint8).numpy()
            for s in range(0, flat.size, _HASH_CHUNK):
                h.update(flat[s : s + _HASH_CHUNK].data)
    return h.hexdigest()


def save_index(index: EmbeddingIndex, path: str | os.PathLike[str]) -> Path:
    """Write ``index`` to ``path`` atomically; see :meth:`EmbeddingIndex.save`."""
    from safetensors.torch import save_file

    # One state, whatever other threads add or remove meanwhile.
    snap = index._snapshot()
    metadata = list(snap.metadata[: snap.n])
    try:
        meta_bytes = json.dumps(metadata, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # A file name that is not UTF-8 (os.fsdecode's lone surrogates, "caf\udce9.png"):
        # JSON's \u escapes keep it losslessly, and json.loads gives back the same string.
        meta_bytes = json.dumps(metadata).encode("ascii")
    tensors = {
        "vectors": snap.vectors.cpu().contiguous(),
        "ids": snap.ids.cpu().contiguous(),
        "labels": snap.labels.contiguous(),
        "metadata": torch.frombuffer(bytearray(meta_bytes), dtype=torch.uint8),
    }
    dtype_name = str(index.dtype).removeprefix("torch.")
    config = {
        "dim": index.dim,
        "dtype": dtype_name,
        "metric": index.metric,
        "memory_budget": index.memory_budget,
        "next_id": index._store.next_id,
        "count": snap.n,
        "featurescope_version": __version__,
    }
    header = {"format": FORMAT, "config": json.dumps(config), "sha256": _digest(tensors)}
    target = Path(path)
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return target


def _read(p: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types, and OSError
        raise IndexFileError(
            f"{p} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc
    return header, tensors


def _config(p: Path, header: dict[str, str]) -> dict[str, Any]:
    tag = header.get("format")
    if tag != FORMAT:
        if isinstance(tag, str) and tag.startswith("featurescope-index/"):
            raise IndexFileError(
                f"{p} has index format {tag!r}; this featurescope reads {FORMAT!r}"
            )
        raise IndexFileError(f"{p} is not a featurescope index (no {FORMAT!r} format tag)")
    try:
        config = json.loads(header["config"])
        dim, count, budget, next_id = (
            int(config[k]) for k in ("dim", "count", "memory_budget", "next_id")
        )
        dtype = _DTYPES[config["dtype"]]
        # Files written before metrics existed hold Euclidean indexes.
        metric = str(config.get("metric", "l2"))
    except (KeyError, TypeError, ValueError) as exc:
        raise IndexFileError(f"{p}: corrupt index configuration ({exc!r})") from exc
    return {
        "dim": dim,
        "count": count,
        "budget": budget,
        "next_id": next_id,
        "dtype": dtype,
        "metric": metric,
    }


def _check_tensors(
    p: Path, tensors: dict[str, Tensor], header: dict[str, str], cfg: dict[str, Any]
) -> list[Any]:
    if set(tensors) != set(_TENSORS):
        raise IndexFileError(f"{p}: expected tensors {sorted(_TENSORS)}, found {sorted(tensors)}")
    for name, dtype in _TENSORS.items():
        if tensors[name].dtype != dtype:
            raise IndexFileError(
                f"{p}: tensor {name!r} has dtype {tensors[name].dtype}, not {dtype}"
            )
    n, dim = cfg["count"], cfg["dim"]
    shapes = {"vectors": (n, dim), "ids": (n,), "labels": (n,)}
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise IndexFileError(
                f"{p}: tensor {name!r} has shape {tuple(tensors[name].shape)}, not {shape}"
            )
    if header.get("sha256") != _digest(tensors):
        raise IndexFileError(f"{p}: checksum mismatch; the file was altered or damaged")
    try:
        meta = json.loads(bytes(tensors["metadata"].numpy()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise IndexFileError(f"{p}: corrupt metadata strings ({exc})") from exc
    if (
        not isinstance(meta, list)
        or len(meta) != n
        or not all(m is None or isinstance(m, str) for m in meta)
    ):
        raise IndexFileError(f"{p}: metadata must be {n} strings or nulls")
    return meta


def load_index(
    cls: type[EmbeddingIndex],
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    memory_budget: int | None = None,
    mmap: bool = False,
    config: SearchConfig | None = None,
) -> EmbeddingIndex:
    """Read an index written by :func:`save_index`; see :meth:`EmbeddingIndex.load`."""
    p = Path(path)
    if not p.is_file():
        raise IndexFileError(f"index file {str(p)!r} does not exist or is not a file")
    if mmap:
        return _map_index(cls, p, device=device, memory_budget=memory_budget, config=config)
    header, tensors = _read(p)
    cfg = _config(p, header)
    meta = _check_tensors(p, tensors, header, cfg)
    labels = tensors["labels"].clone()
    if cfg["count"] and int(labels.min()) < -1:
        raise IndexFileError(f"{p}: labels below -1")
    try:
        index = cls(
            cfg["dim"],
            device=device,
            dtype=cfg["dtype"],
            memory_budget=cfg["budget"],
            metric=cfg["metric"],
            config=config,
        )
    except FeaturescopeError as exc:
        raise IndexFileError(f"{p}: invalid index configuration: {exc}") from exc
    if memory_budget is not None:
        # A budget the caller chose: its errors are the caller's, not the file's.
        index = cls(
            cfg["dim"],
            device=device,
            dtype=cfg["dtype"],
            memory_budget=memory_budget,
            metric=cfg["metric"],
            config=config,
        )
    try:
        vectors, radius = as_vectors_and_norms(tensors["vectors"], cfg["dim"])
        ids = as_ids(tensors["ids"], cfg["count"])
        if cfg["count"]:
            # The store copies the rows: the file's tensors are not kept.
            index._store.append(vectors, ids, labels, meta, radius)
    except IndexFileError:
        raise
    except FeaturescopeError as exc:
        raise IndexFileError(f"{p}: invalid index contents: {exc}") from exc
    index._store.next_id = max(index._store.next_id, cfg["next_id"])
    return index


def _map_safetensors(p: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The header and memory-mapped tensors of a safetensors file, checked against its size."""
    size = p.stat().st_size
    try:
        with p.open("rb") as fh:
            head = int.from_bytes(fh.read(8), "little")
            if head <= 0 or 8 + head > size:
                raise ValueError(f"header length {head} does not fit a {size}-byte file")
            layout = json.loads(fh.read(head))
        header = layout.pop("__metadata__", None) or {}
        tensors = {}
        for name, info in layout.items():
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(int(v) for v in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
            count = int(np.prod(shape))
            if end - begin != count * dtype.itemsize or begin < 0 or 8 + head + end > size:
                raise ValueError(f"tensor {name!r} does not fit the file")
            if count == 0:
                tensors[name] = torch.from_numpy(np.empty(shape, dtype=dtype))
                continue
            array = np.memmap(p, dtype=dtype, mode="c", offset=8 + head + begin, shape=shape)
            tensors[name] = torch.from_numpy(array)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IndexFileError(
            f"{p} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc
    return header, tensors


def _map_index(
    cls: type[EmbeddingIndex],
    p: Path,
    *,
    device: str | torch.device,
    memory_budget: int | None,
    config: SearchConfig | None = None,
) -> EmbeddingIndex:
    """Open ``p`` with its vectors, ids and labels memory-mapped; see :meth:`EmbeddingIndex.load`."""
    from featurescope.index._mapped import MappedStore

    header, tensors = _map_safetensors(p)
    cfg = _config(p, header)
    if cfg["dtype"] != torch.float32:
        raise IndexFileError(
            f"{p} holds a {cfg['dtype']} index; mmap=True searches float32 vectors in place, so "
            "load this one with mmap=False"
        )
    meta = _check_tensors(p, tensors, header, cfg)
    budget = cfg["budget"] if memory_budget is None else memory_budget
    try:
        index = cls(
            cfg["dim"], device=device, memory_budget=budget, metric=cfg["metric"], config=config
        )
        if torch.device(device).type != "cpu":
            raise FeaturescopeError(f"mmap=True searches on the CPU, not {device}")
    except FeaturescopeError as exc:
        if memory_budget is not None:
            raise
        raise IndexFileError(f"{p}: invalid index configuration: {exc}") from exc
    if cfg["count"] == 0:
        return index
    labels = tensors["labels"]
    if int(labels.min()) < -1:
        raise IndexFileError(f"{p}: labels below -1")
    ids = tensors["ids"]
    if torch.unique(ids).numel() != ids.numel():
        raise IndexFileError(f"{p}: invalid index contents: duplicate ids")
    try:
        store = MappedStore(
            tensors["vectors"],
            ids,
            labels,
            meta,
            p,
            index.memory_budget,
            cfg["next_id"],
            index._metric,
        )
    except FeaturescopeError as exc:
        raise IndexFileError(f"{p}: invalid index contents: {exc}") from exc
    index._store = store
    return index
