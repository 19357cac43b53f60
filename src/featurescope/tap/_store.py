"""Features on disk: one ``.npy`` per node and a JSON manifest that never claims unwritten rows.

A folder written by :meth:`featurescope.FeatureTap.extract` holds::

    manifest.json      what was extracted and how far it got (see below)
    <alias>.npy        [num_samples, *shape] features of one node, in sample order
    labels.npy         [num_samples] labels, when the dataset gives them

The ``.npy`` files are created at full size when the first batch is ready and filled a batch at
a time through short-lived memory maps, so memory never holds more than one batch. The manifest
records ``completed``, the number of leading rows that are really on disk; it is rewritten
atomically only after those rows are written and synced, so an interrupted run leaves a manifest
that tells the truth and the next run resumes from ``completed``. Under ``torch.distributed``
each rank writes its own folder ``rank{r}/`` and :func:`merge_features` writes a top-level
manifest listing the shards.

Manifest keys: ``format``, ``version``, ``model``, ``preprocessing``, ``nodes`` (``{alias: {node,
file, shape, dtype}}``, ``shape`` per sample), ``reduce``, ``num_samples``, ``completed``,
``sample_ids`` (dataset indices, in row order), ``labels`` (file name or null), ``paths`` (or
null), ``weights`` and ``data`` (fingerprints of the weights and of the samples, which a resumed
run must match), ``rank``, ``world_size``; a merged manifest has ``shards`` instead of files.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

from featurescope._io import atomic_open
from featurescope.errors import FeaturescopeError

__all__ = ["MANIFEST", "Extraction", "ShardWriter", "load_features", "merge_features"]

MANIFEST = "manifest.json"
FORMAT = "featurescope.features"
VERSION = 1
LABELS = "labels.npy"
# A commit (fsync + manifest rewrite) may cost at most 1/ratio of the time spent extracting.
_COMMIT_COST_RATIO = 20.0


@dataclass
class Extraction:
    """What :meth:`~featurescope.FeatureTap.extract` returns: features and what they belong to.

    Indexing with an alias gives that node's features: ``extraction["conv1"]``.

    Attributes:
        features: ``{alias: array [num_samples, ...]}``; memory-mapped when read from disk.
        sample_ids: the dataset index of each row.
        labels: each row's label, or ``None`` when the dataset gives none.
        paths: each row's file, for datasets that list them (``ImageFolder.samples``).
        manifest: the manifest, for extractions on disk.
        out: the folder, for extractions on disk.
    """

    features: dict[str, np.ndarray]
    sample_ids: np.ndarray
    labels: np.ndarray | None = None
    paths: list[str] | None = None
    manifest: dict[str, Any] | None = None
    out: Path | None = None
    nodes: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, alias: str) -> np.ndarray:
        return self.features[alias]

    def __iter__(self) -> Iterator[str]:
        return iter(self.features)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def keys(self) -> list[str]:
        """The aliases, as in the tap's output."""
        return list(self.features)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest in ``folder``, or ``None`` if there is none."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FeaturescopeError(f"{path} is not a readable featurescope manifest: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise FeaturescopeError(f"{path} is not a featurescope features manifest")
    return manifest


def _write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    with atomic_open(folder / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)


def _file_names(aliases: Sequence[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    taken = {LABELS, MANIFEST}
    for alias in aliases:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", alias).strip(".") or "node"
        name, i = f"{stem}.npy", 1
        while name in taken:
            name, i = f"{stem}_{i}.npy", i + 1
        taken.add(name)
        names[alias] = name
    return names


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reserve(path: Path, size: int) -> None:
    """Allocate ``size`` bytes of ``path`` on disk now, so that a full disk is an ``OSError``
    here, naming the file, and never a SIGBUS later (a sparse file written through a memory map
    faults when the disk has no block for a page). File systems without ``posix_fallocate``
    are left sparse: rows are written with ordinary writes, which fail just as clearly."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            reason = f"cannot reserve {size} bytes ({exc.strerror})"
            raise OSError(exc.errno, reason, str(path)) from exc
    except AttributeError:  # no posix_fallocate (macOS, Windows)
        pass
    finally:
        os.close(fd)


def _new_npy(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """An ``.npy`` file of ``shape`` with every block allocated (see :func:`_reserve`)."""
    try:
        array = open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        size = int(array.offset) + array.nbytes
        del array  # unmapped: the rows are written with ordinary writes
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    _reserve(path, size)


class _NpyRows:
    """Writes rows into an existing ``.npy`` file with ordinary writes at their offset.

    A failed write (a full disk, a quota, a file size limit) is an ``OSError`` naming the file,
    raised before the manifest counts the rows: the extraction stays resumable.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        header = np.load(path, mmap_mode="r")
        self.offset = int(header.offset)
        self.dtype = header.dtype
        self.shape = tuple(header.shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        del header

    def write(self, start: int, rows: np.ndarray) -> None:
        if len(rows) == 0:
            return
        data = np.ascontiguousarray(rows, dtype=self.dtype).reshape(-1).view(np.uint8).data
        at = self.offset + start * self.row_bytes
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                while data:
                    done = os.pwrite(fd, data, at)
                    data, at = data[done:], at + done
            finally:
                os.close(fd)
        except OSError as exc:
            raise OSError(
                exc.errno, f"{exc.strerror} while writing features", str(self.path)
            ) from exc


class ShardWriter:
    """Streams one process's features into ``folder``, resuming what a previous run began.

    Args:
        folder: the shard's folder (created if needed).
        header: ``model``, ``preprocessing``, ``weights`` (a fingerprint), ``nodes``
            (``{alias: node}``), ``reduce``, ``data`` (a fingerprint of the samples),
            ``rank`` and ``world_size`` of this extraction.
        sample_ids: the dataset indices to extract, in order.
        paths: their files, or ``None``.
        overwrite: start afresh even if ``folder`` already holds an extraction (resumable or not).

    Raises:
        FeaturescopeError: ``folder`` holds a different extraction and ``overwrite`` is false.
    """

    def __init__(
        self,
        folder: Path,
        header: Mapping[str, Any],
        sample_ids: np.ndarray,
        paths: list[str] | None,
        overwrite: bool = False,
    ) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.manifest: dict[str, Any] | None = None
        self.completed = 0
        self.sample_ids = sample_ids
        self.paths = paths
        self._header = dict(header)
        self._files: dict[str, _NpyRows] = {}
        self._labels: _NpyRows | None = None
        self._checked = False
        self._since_commit = time.perf_counter()
        self._commit_cost = 0.0
        existing = read_manifest(folder)
        if existing is None:
            return
        if overwrite:
            # Start afresh even when the old run looks resumable: overwrite=True asks for new
            # rows, and data of the same length can still differ in ways no manifest records.
            # Remove the old manifest first: it must not describe files we are about to reuse.
            (folder / MANIFEST).unlink()
        elif _same_extraction(existing, header, sample_ids, paths):
            self.manifest = existing
            self.completed = int(existing["completed"])
            # The first run fixed the order (a shuffling DataLoader would draw another).
            self.sample_ids = np.asarray(existing["sample_ids"], dtype=np.int64)
            self.paths = existing.get("paths")
            self._open_files()
        elif existing.get("weights") != header.get("weights") and _same_extraction(
            existing, {**header, "weights": existing.get("weights")}, sample_ids, paths
        ):
            raise FeaturescopeError(
                f"{folder} holds an extraction of {existing.get('model')!r} made with other "
                f"weights (fingerprint {str(existing.get('weights'))[:12]}, now "
                f"{str(header.get('weights'))[:12]}): resuming would mix features of two sets of "
                "weights. Pass overwrite=True to start afresh, or choose another folder."
            )
        elif existing.get("data") != header.get("data") and _same_extraction(
            existing, {**header, "data": existing.get("data")}, sample_ids, paths
        ):
            raise FeaturescopeError(
                f"{folder} holds an extraction of other data with as many samples "
                f"({existing.get('num_samples')}; data fingerprint "
                f"{str(existing.get('data'))[:12]}, now {str(header.get('data'))[:12]}: the files' "
                "names or sizes, or the first sample, differ): resuming would return the old "
                "data's features. Pass overwrite=True to start afresh, or choose another folder."
            )
        else:
            raise FeaturescopeError(
                f"{folder} already holds a different extraction (model {existing.get('model')!r}, "
                f"nodes {sorted(existing.get('nodes', {}))}, {existing.get('num_samples')} "
                "samples); choose another folder or pass overwrite=True."
            )

    @property
    def done(self) -> bool:
        """Whether every planned row is on disk."""
        return self.manifest is not None and self.completed >= len(self.sample_ids)

    def _open_files(self) -> None:
        assert self.manifest is not None
        for alias, entry in self.manifest["nodes"].items():
            npy = _NpyRows(self.folder / entry["file"])
            if npy.shape[0] != len(self.sample_ids):
                raise FeaturescopeError(
                    f"{npy.path} has {npy.shape[0]} rows but the manifest plans "
                    f"{len(self.sample_ids)}; the folder is damaged, extract with overwrite=True."
                )
            self._files[alias] = npy
        if self.manifest.get("labels"):
            self._labels = _NpyRows(self.folder / self.manifest["labels"])

    def _create(self, arrays: Mapping[str, np.ndarray], labels: np.ndarray | None) -> None:
        n = len(self.sample_ids)
        names = _file_names(list(arrays))
        nodes = {}
        for alias, batch in arrays.items():
            path = self.folder / names[alias]
            _new_npy(path, batch.dtype, (n, *batch.shape[1:]))
            self._files[alias] = _NpyRows(path)
            nodes[alias] = {
                "node": self._header["nodes"][alias],
                "file": names[alias],
                "shape": list(batch.shape[1:]),
                "dtype": str(batch.dtype),
            }
        if labels is not None:
            _new_npy(self.folder / LABELS, labels.dtype, (n,))
            self._labels = _NpyRows(self.folder / LABELS)
        self.manifest = {
            "format": FORMAT,
            "version": VERSION,
            **{k: v for k, v in self._header.items() if k != "nodes"},
            "nodes": nodes,
            "num_samples": n,
            "completed": 0,
            "labels": LABELS if labels is not None else None,
            "sample_ids": [int(i) for i in self.sample_ids],
            "paths": self.paths,
        }

    def _check(self, arrays: Mapping[str, np.ndarray], labels: np.ndarray | None) -> None:
        assert self.manifest is not None
        for alias, batch in arrays.items():
            entry = self.manifest["nodes"][alias]
            if list(batch.shape[1:]) != entry["shape"] or str(batch.dtype) != entry["dtype"]:
                raise FeaturescopeError(
                    f"node {alias!r} now gives {list(batch.shape[1:])} {batch.dtype} per sample "
                    f"but {self.folder} holds {entry['shape']} {entry['dtype']}; extract into "
                    "another folder or pass overwrite=True."
                )
        if (labels is None) != (self._labels is None):
            raise FeaturescopeError(
                f"the dataset {'now gives' if labels is not None else 'no longer gives'} labels, "
                f"unlike the extraction in {self.folder}"
            )

    def write(self, arrays: Mapping[str, np.ndarray], labels: np.ndarray | None) -> None:
        """Append one batch of rows; commit them when a commit is cheap enough."""
        if self.manifest is None:
            self._create(arrays, labels)
        elif not self._checked:
            self._check(arrays, labels)
        self._checked = True
        start = self.completed
        for alias, batch in arrays.items():
            self._files[alias].write(start, batch)
        if self._labels is not None and labels is not None:
            self._labels.write(start, labels)
        self.completed = start + len(next(iter(arrays.values())))
        if time.perf_counter() - self._since_commit >= _COMMIT_COST_RATIO * self._commit_cost:
            self.commit()

    def commit(self) -> None:
        """Sync the written rows to disk, then record them in the manifest (atomically)."""
        if self.manifest is None:
            return
        began = time.perf_counter()
        for npy in (*self._files.values(), *([self._labels] if self._labels else [])):
            _fsync(npy.path)
        self.manifest["completed"] = self.completed
        _write_manifest(self.folder, self.manifest)
        now = time.perf_counter()
        self._commit_cost = now - began
        self._since_commit = now


def _same_extraction(
    existing: Mapping[str, Any],
    header: Mapping[str, Any],
    sample_ids: np.ndarray,
    paths: list[str] | None,
) -> bool:
    nodes = {alias: entry.get("node") for alias, entry in existing.get("nodes", {}).items()}
    return (
        existing.get("version") == VERSION
        and existing.get("model") == header["model"]
        # Through JSON, as the manifest stored it (tuples come back as lists).
        and existing.get("preprocessing") == json.loads(json.dumps(header.get("preprocessing")))
        and existing.get("weights") == header.get("weights")
        # A manifest written before data fingerprints existed records none: it resumes as then.
        and existing.get("data", header.get("data")) == header.get("data")
        and nodes == dict(header["nodes"])
        and existing.get("reduce") == header["reduce"]
        and existing.get("rank") == header["rank"]
        and existing.get("world_size") == header["world_size"]
        and existing.get("num_samples") == len(sample_ids)
        and "shards" not in existing
        and _same_paths(existing, sample_ids, paths)
    )


def _same_paths(
    existing: Mapping[str, Any], sample_ids: np.ndarray, paths: list[str] | None
) -> bool:
    """Whether both runs read the same file for every sample id (when both know their files).

    Compared per id, not per position: a shuffling loader draws another order on each run.
    """
    old_paths = existing.get("paths")
    if old_paths is None and paths is None:
        return True
    if old_paths is None or paths is None:
        return False
    old = dict(zip((int(i) for i in existing.get("sample_ids", [])), old_paths, strict=False))
    new = dict(zip((int(i) for i in sample_ids), paths, strict=False))
    return old == new


def _load_shard(folder: Path, manifest: dict[str, Any]) -> Extraction:
    done = int(manifest["completed"])
    features = {
        alias: np.load(folder / entry["file"], mmap_mode="r")[:done]
        for alias, entry in manifest["nodes"].items()
    }
    labels = (
        np.load(folder / manifest["labels"], mmap_mode="r")[:done] if manifest["labels"] else None
    )
    paths = manifest.get("paths")
    return Extraction(
        features=features,
        sample_ids=np.asarray(manifest["sample_ids"][:done], dtype=np.int64),
        labels=labels,
        paths=list(paths[:done]) if paths is not None else None,
        manifest=manifest,
        out=folder,
        nodes={alias: entry["node"] for alias, entry in manifest["nodes"].items()},
    )


def load_features(folder: str | os.PathLike[str]) -> Extraction:
    """Read an extraction written by :meth:`~featurescope.FeatureTap.extract` with ``out=``.

    Only the rows the manifest records as written are returned, memory-mapped. For a folder of
    ``torch.distributed`` shards merged by :func:`merge_features`, the shards' rows are read
    into memory and sorted by sample id.

    Raises:
        FeaturescopeError: ``folder`` has no featurescope manifest.

    Example:
        >>> import tempfile, torch, featurescope as fs
        >>> from torch.utils.data import TensorDataset
        >>> tap = fs.FeatureTap(torch.nn.Sequential(torch.nn.Linear(4, 3)), {"0": "out"})
        >>> data = TensorDataset(torch.randn(5, 4), torch.arange(5))
        >>> folder = tempfile.mkdtemp() + "/features"
        >>> _ = tap.extract(data, batch_size=2, out=folder, progress=False)
        >>> again = fs.load_features(folder)
        >>> again["out"].shape, again.labels.tolist()
        ((5, 3), [0, 1, 2, 3, 4])
    """
    root = Path(folder)
    manifest = read_manifest(root)
    if manifest is None:
        raise FeaturescopeError(
            f"{root} has no {MANIFEST}; it is not a featurescope extraction (or not merged yet: "
            "featurescope.tap.merge_features)"
        )
    if "shards" not in manifest:
        return _load_shard(root, manifest)
    parts = []
    for shard in manifest["shards"]:
        sub = read_manifest(root / shard["dir"])
        if sub is None:
            raise FeaturescopeError(f"shard {root / shard['dir']} has no {MANIFEST}")
        parts.append(_load_shard(root / shard["dir"], sub))
    ids = np.concatenate([p.sample_ids for p in parts])
    order = np.argsort(ids, kind="stable")
    features = {a: np.concatenate([p.features[a] for p in parts])[order] for a in manifest["nodes"]}
    labels = None
    if all(p.labels is not None for p in parts):
        labels = np.concatenate([p.labels for p in parts if p.labels is not None])[order]
    paths = None
    if all(p.paths is not None for p in parts):
        flat = [path for p in parts for path in (p.paths or [])]
        paths = [flat[i] for i in order]
    return Extraction(
        features, ids[order], labels, paths, manifest, root, dict(parts[0].nodes) if parts else {}
    )


def merge_features(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``folder/manifest.json`` combining the ``rank*/`` shards of a distributed extraction.

    The merged manifest lists each shard with its sample and completed counts; the feature files
    stay where they are. :func:`load_features` reads the merged folder as one extraction.

    Returns:
        The merged manifest.

    Raises:
        FeaturescopeError: there are no shards, or they describe different extractions.
    """
    root = Path(folder)
    shard_dirs = sorted(
        (p for p in root.glob("rank*") if p.is_dir() and p.name[4:].isdigit()),
        key=lambda p: int(p.name[4:]),
    )
    manifests = [(d, read_manifest(d)) for d in shard_dirs]
    shards = [(d, m) for d, m in manifests if m is not None]
    if not shards:
        raise FeaturescopeError(f"{root} has no rank*/{MANIFEST} shards to merge")
    first = shards[0][1]
    if len(shards) != int(first.get("world_size") or 1):
        raise FeaturescopeError(
            f"{root} has {len(shards)} shard(s) but the extraction ran on "
            f"{first.get('world_size')} processes; wait for every rank to finish"
        )
    keys = ("model", "reduce", "nodes", "world_size", "preprocessing", "weights")
    for d, m in shards[1:]:
        for key in keys:
            if m.get(key) != first.get(key):
                raise FeaturescopeError(
                    f"shard {d} differs from {shards[0][0]} in {key!r}; they are not parts of "
                    "one extraction"
                )
    merged = {
        "format": FORMAT,
        "version": VERSION,
        **{key: first.get(key) for key in keys},
        "num_samples": sum(int(m["num_samples"]) for _, m in shards),
        "completed": sum(int(m["completed"]) for _, m in shards),
        "labels": first.get("labels"),
        "sample_ids": [i for _, m in shards for i in m["sample_ids"][: int(m["completed"])]],
        "shards": [
            {
                "dir": d.name,
                "rank": m.get("rank"),
                "num_samples": m["num_samples"],
                "completed": m["completed"],
            }
            for d, m in shards
        ],
    }
    _write_manifest(root, merged)
    return merged
