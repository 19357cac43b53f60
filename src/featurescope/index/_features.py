"""Build an index straight from a folder written by ``FeatureTap.extract(out=...)``.

The folder's format (``manifest.json`` plus one ``.npy`` per node, see ``featurescope.tap``) is
read here directly, so the index needs nothing from the tap: the manifest's ``completed`` rows
of one node become the vectors, ``sample_ids`` the ids, ``labels.npy`` the labels and ``paths``
the metadata. With ``mmap=True`` the vectors stay in the ``.npy`` file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from featurescope.errors import EmbeddingIndexError, FeaturescopeError, UnknownNameError
from featurescope.index._checks import as_ids, as_labels

if TYPE_CHECKING:
    from featurescope.index._embedding import EmbeddingIndex
    from featurescope.index._search._config import SearchConfig

__all__ = ["index_from_features"]

_FORMAT = "featurescope.features"


def _manifest(root: Path) -> dict[str, Any]:
    path = root / "manifest.json"
    if not path.is_file():
        raise EmbeddingIndexError(
            f"{root} has no manifest.json; pass the folder given to FeatureTap.extract(out=...)"
        )
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EmbeddingIndexError(f"{path} is not a readable featurescope manifest: {exc}") from exc
    if manifest.get("format") != _FORMAT:
        raise EmbeddingIndexError(f"{path} is not a featurescope features manifest")
    if "shards" in manifest:
        raise EmbeddingIndexError(
            f"{root} is a merged distributed extraction; build one index per rank folder "
            "(rank0/, rank1/, ...) or a ShardedEmbeddingIndex"
        )
    _check_fields(path, manifest)
    return manifest


def _is_file_name(value: Any) -> bool:
    """A plain name of a file in the folder: the manifest may not point elsewhere."""
    return isinstance(value, str) and bool(value) and Path(value).name == value


def _check_fields(path: Path, manifest: dict[str, Any]) -> None:
    """Every field the index reads, by type and size, before any is used.

    Raises:
        EmbeddingIndexError: naming the first field that is missing or wrong.
    """

    def bad(field: str, what: str) -> EmbeddingIndexError:
        shown = repr(manifest.get(field, "<missing>"))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return EmbeddingIndexError(f"{path}: field {field!r} must be {what}, got {shown}")

    nodes = manifest.get("nodes")
    if not isinstance(nodes, dict) or not all(
        isinstance(entry, dict) and _is_file_name(entry.get("file")) for entry in nodes.values()
    ):
        raise bad("nodes", "an object of {alias: {'file': a file name in the folder}}")
    done = manifest.get("completed")
    if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= 2**48:
        raise bad("completed", "a non-negative integer")
    ids = manifest.get("sample_ids")
    if not isinstance(ids, list) or len(ids) < done:
        raise bad("sample_ids", f"a list of at least {done} integers")
    if manifest.get("labels") is not None and not _is_file_name(manifest["labels"]):
        raise bad("labels", "null or a file name in the folder")
    paths = manifest.get("paths")
    if paths is not None and (not isinstance(paths, list) or len(paths) < done):
        raise bad("paths", f"null or a list of at least {done} paths")


def index_from_features(
    cls: type[EmbeddingIndex],
    folder: str | os.PathLike[str],
    node: str | None,
    *,
    mmap: bool,
    memory_budget: int,
    metric: str = "l2",
    config: SearchConfig | None = None,
) -> EmbeddingIndex:
    """See :meth:`EmbeddingIndex.from_features`."""
    from featurescope.index._mapped import MappedStore, map_rows

    root = Path(folder)
    manifest = _manifest(root)
    nodes: dict[str, Any] = manifest.get("nodes", {})
    if node is None:
        if len(nodes) != 1:
            raise EmbeddingIndexError(
                f"{root} holds {len(nodes)} nodes {sorted(nodes)}; pass node= to pick one"
            )
        node = next(iter(nodes))
    if node not in nodes:
        raise UnknownNameError(f"{root} has no node {node!r}; it holds {sorted(nodes)}")
    try:
        done = int(manifest["completed"])
        feats = np.load(root / nodes[node]["file"], mmap_mode="c")[:done]
        ids = as_ids(np.asarray(manifest["sample_ids"][:done], dtype=np.int64), done)
        labels_file = manifest.get("labels")
        paths = manifest.get("paths")
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise EmbeddingIndexError(f"{root}: unreadable extraction ({exc!r})") from exc
    except FeaturescopeError as exc:
        raise EmbeddingIndexError(f"{root}: invalid sample_ids: {exc}") from exc
    if len(feats) < done:
        raise EmbeddingIndexError(
            f"{root}: the manifest counts {done} completed rows but {nodes[node]['file']} "
            f"holds {len(feats)}; the folder is damaged"
        )
    vectors = feats.reshape(done, -1)
    if labels_file:
        try:
            stored = np.array(np.load(root / labels_file, mmap_mode="r")[:done])
        except (OSError, ValueError) as exc:
            raise EmbeddingIndexError(f"{root}: unreadable labels file ({exc})") from exc
        labels = as_labels(stored, done)
    else:
        labels = torch.full((done,), -1, dtype=torch.int64)
    metadata: list[str | None] = [None] * done if paths is None else [str(p) for p in paths[:done]]
    index = cls(vectors.shape[1], memory_budget=memory_budget, metric=metric, config=config)
    if done == 0:
        return index
    if not mmap:
        index.add(vectors, ids=ids, labels=labels if labels_file else None, metadata=metadata)
        return index
    if vectors.dtype != np.float32 or not vectors.flags.c_contiguous:
        raise EmbeddingIndexError(
            f"node {node!r} is stored as {vectors.dtype}; mmap=True searches float32 rows in "
            "place, so pass mmap=False (the rows are converted in memory)"
        )
    index._store = MappedStore(
        map_rows(vectors),
        ids,
        labels,
        metadata,
        root / nodes[node]["file"],
        index.memory_budget,
        int(ids.max()) + 1,
        index._metric,
    )
    return index
