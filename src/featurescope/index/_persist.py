"""Saving and loading an :class:`~featurescope.EmbeddingIndex`: safetensors plus JSON, no pickle.

One ``.safetensors`` file holds ``vectors`` (float32), ``ids`` and ``labels`` (int64) and the
metadata strings as UTF-8 JSON bytes (``metadata``, uint8); its header carries the format tag,
a JSON ``config`` (dim, dtype, memory budget, next automatic id) and a SHA-256 of the tensors,
so a truncated, altered or foreign file is refused with :class:`~featurescope.errors.IndexFileError`.
"""

from __future__ import annotations

import hashlib
import json
import math
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


#: Integer fields of the configuration and their ranges (inclusive). An empty index holds no
#: rows to bound its ``dim`` by, and opening one allocates ``dim`` floats: hence the cap.
_INT_FIELDS = {
    "dim": (1, 2**24),
    "count": (0, 2**48),
    "memory_budget": (1, 2**62),
    "next_id": (-(2**63), 2**63 - 1),
}


def _config(p: Path, header: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(header, dict):
        raise IndexFileError(f"{p}: the safetensors '__metadata__' must be an object of strings")
    tag = header.get("format")
    if tag != FORMAT:
        if isinstance(tag, str) and tag.startswith("featurescope-index/"):
            raise IndexFileError(
                f"{p} has index format {tag!r}; this featurescope reads {FORMAT!r}"
            )
        raise IndexFileError(f"{p} is not a featurescope index (no {FORMAT!r} format tag)")
    config = _json_field(p, header.get("config"), "config (the index configuration)")
    if not isinstance(config, dict):
        raise IndexFileError(f"{p}: index configuration must be a JSON object")
    out: dict[str, Any] = {}
    for name, (low, high) in _INT_FIELDS.items():
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise IndexFileError(
                f"{p}: index configuration field {name!r} must be an integer in "
                f"[{low}, {high}], got {_short(value)}"
            )
        out["budget" if name == "memory_budget" else name] = value
    dtype = config.get("dtype")
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise IndexFileError(
            f"{p}: index configuration field 'dtype' must be one of {sorted(_DTYPES)}, "
            f"got {_short(dtype)}"
        )
    # Files written before metrics existed hold Euclidean indexes.
    metric = config.get("metric", "l2")
    if not isinstance(metric, str):
        raise IndexFileError(
            f"{p}: index configuration field 'metric' must be a string, got {_short(metric)}"
        )
    out["dtype"], out["metric"] = _DTYPES[dtype], metric
    return out


def _short(value: Any) -> str:
    """``repr(value)``, cut short: a hostile file may hold megabytes in one field."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_field(p: Path, text: Any, name: str) -> Any:
    """Parse one JSON field of a header; nesting too deep for the parser is corruption too."""
    if not isinstance(text, str):
        raise IndexFileError(
            f"{p}: header field {name!r} must be a JSON string, got {_short(text)}"
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise IndexFileError(f"{p}: header field {name!r} is not valid JSON ({reason})") from exc


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
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise IndexFileError(f"{p}: corrupt metadata strings ({reason})") from exc
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


def _map_safetensors(p: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The header and memory-mapped tensors of a safetensors file, checked against its size
    before anything is mapped or allocated."""
    size = p.stat().st_size
    try:
        with p.open("rb") as fh:
            head = int.from_bytes(fh.read(8), "little")
            if head <= 0 or 8 + head > size:
                raise ValueError(f"header length {head} does not fit a {size}-byte file")
            layout = json.loads(fh.read(head))
        if not isinstance(layout, dict):
            raise ValueError("the header is not a JSON object")
        header = layout.pop("__metadata__", None) or {}
        tensors = {}
        for name, info in layout.items():
            dtype, shape, begin, end = _tensor_entry(name, info)
            count = math.prod(shape)
            if end - begin != count * dtype.itemsize or 8 + head + end > size:
                raise ValueError(f"tensor {name!r} does not fit the file")
            if count == 0:
                tensors[name] = torch.from_numpy(np.empty(shape, dtype=dtype))
                continue
            array = np.memmap(p, dtype=dtype, mode="c", offset=8 + head + begin, shape=shape)
            tensors[name] = torch.from_numpy(array)
    except RecursionError as exc:
        raise IndexFileError(f"{p}: the safetensors header is nested too deeply") from exc
    except (OSError, ValueError) as exc:
        raise IndexFileError(
            f"{p} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from exc
    return header, tensors


def _tensor_entry(name: str, info: Any) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    """``dtype``, ``shape`` and ``data_offsets`` of one tensor of a safetensors header.

    Raises:
        ValueError: naming the tensor and the field that is missing, mistyped or negative.
    """
    if not isinstance(info, dict):
        raise ValueError(f"tensor {name!r}: its entry must be an object, got {_short(info)}")
    dtype_name = info.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in _ST_DTYPES:
        raise ValueError(
            f"tensor {name!r}: field 'dtype' {_short(dtype_name)} is not one of "
            f"{sorted(_ST_DTYPES)}"
        )
    fields = {}
    for field, length in (("shape", None), ("data_offsets", 2)):
        value = info.get(field)
        if (
            not isinstance(value, list)
            or (length is not None and len(value) != length)
            or len(value) > 8
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        ):
            raise ValueError(
                f"tensor {name!r}: field {field!r} must be a list of non-negative integers, "
                f"got {_short(value)}"
            )
        fields[field] = value
    begin, end = fields["data_offsets"]
    return np.dtype(_ST_DTYPES[dtype_name]), tuple(fields["shape"]), begin, end


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
