"""Galleries left on disk: load(mmap=True) and from_features search in place, read-only, exactly."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch

import featurescope as fs
from featurescope.errors import EmbeddingIndexError, IndexFileError, UnknownNameError


def _data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, d)).astype(np.float32)
    g[n // 2 :] = g[: n - n // 2]  # duplicates: ties to the smaller id
    q = np.concatenate([g[:5], rng.standard_normal((11, d)).astype(np.float32)])
    return g, q, rng.permutation(3 * n)[:n], rng.integers(0, 4, n)


def _index(n=3000, d=12, budget=1 << 20):
    g, q, ids, labels = _data(n, d)
    index = fs.EmbeddingIndex(d, memory_budget=budget)
    index.add(g, ids=ids, labels=labels, metadata=[f"img{i}.png" for i in range(n)])
    return index, q


def _same(a, b):
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.distances, b.distances)
    assert torch.equal(a.labels, b.labels)


def test_mapped_index_equals_in_memory(tmp_path):
    index, q = _index()
    path = index.save(tmp_path / "g.safetensors")
    mapped = fs.EmbeddingIndex.load(path, mmap=True)
    assert mapped.mapped == path and index.mapped is None
    assert len(mapped) == len(index) and mapped.metadata == index.metadata
    for k in (1, 7, 3000):
        _same(mapped.search(q, k), index.search(q, k))
    mask = index.select(labels=[1, 3])
    _same(mapped.search(q, 9, where=mask), index.search(q, 9, where=mask))
    excl = index.ids[:16]
    _same(mapped.search(q, 4, exclude_ids=excl), index.search(q, 4, exclude_ids=excl))
    assert mapped.search(q[:2], 2).metadata == index.search(q[:2], 2).metadata


def test_mapped_index_is_read_only_and_unchanged(tmp_path):
    index, q = _index(200, 4)
    path = index.save(tmp_path / "g.safetensors")
    before = path.read_bytes()
    mapped = fs.EmbeddingIndex.load(path, mmap=True)
    with pytest.raises(EmbeddingIndexError, match="memory-mapped .* mmap=False"):
        mapped.add(torch.zeros(1, 4))
    with pytest.raises(EmbeddingIndexError, match="memory-mapped"):
        mapped.remove(mapped.ids[:1])
    with pytest.raises(EmbeddingIndexError, match="on the CPU"):
        mapped.to("meta")
    assert len(mapped) == 200
    mapped.search(q, 3)
    assert path.read_bytes() == before
    # What the user copies out is theirs: writing to it does not reach the file.
    vec = mapped.vectors
    vec += 1
    assert path.read_bytes() == before
    # The in-memory route still changes and saves.
    again = fs.EmbeddingIndex.load(path)
    again.add(torch.zeros(1, 4))
    assert len(again) == 201


def test_mapped_load_rejects_bad_files(tmp_path):
    index, _ = _index(50, 3)
    path = index.save(tmp_path / "g.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-40] ^= 0xFF  # inside the tensors: checksum
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(IndexFileError, match="checksum"):
        fs.EmbeddingIndex.load(bad, mmap=True)
    short = tmp_path / "short.safetensors"
    short.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IndexFileError, match="truncated or corrupt"):
        fs.EmbeddingIndex.load(short, mmap=True)
    half = fs.EmbeddingIndex(3, dtype=torch.float16)
    half.add(torch.randn(4, 3))
    with pytest.raises(IndexFileError, match="mmap=False"):
        fs.EmbeddingIndex.load(half.save(tmp_path / "h.safetensors"), mmap=True)
    empty = fs.EmbeddingIndex.load(fs.EmbeddingIndex(3).save(tmp_path / "e.safetensors"), mmap=True)
    assert len(empty) == 0


def _extraction(folder, g, ids, labels, paths, completed):
    np.save(folder / "fc.npy", g.reshape(len(g), 2, -1))
    np.save(folder / "labels.npy", labels)
    manifest = {
        "format": "featurescope.features",
        "version": 1,
        "nodes": {"fc": {"node": "fc", "file": "fc.npy", "shape": [2, g.shape[1] // 2]}},
        "completed": completed,
        "num_samples": len(g),
        "sample_ids": ids.tolist(),
        "labels": "labels.npy",
        "paths": paths,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("mmap", [True, False])
def test_from_features_equals_index_of_completed_rows(tmp_path, mmap):
    g, q, ids, labels = _data(500, 8, 3)
    paths = [f"p{i}.jpg" for i in range(500)]
    _extraction(tmp_path, g, ids, labels, paths, completed=420)
    built = fs.EmbeddingIndex.from_features(tmp_path, mmap=mmap, memory_budget=1 << 20)
    assert (built.mapped is not None) == mmap
    ref = fs.EmbeddingIndex(8)
    ref.add(g[:420], ids=ids[:420], labels=labels[:420], metadata=paths[:420])
    _same(built.search(q, 6), ref.search(q, 6))
    assert built.search(q, 2).metadata == ref.search(q, 2).metadata
    with pytest.raises(UnknownNameError, match="no node 'fc8'"):
        fs.EmbeddingIndex.from_features(tmp_path, "fc8")


def test_from_features_errors(tmp_path):
    with pytest.raises(EmbeddingIndexError, match="no manifest.json"):
        fs.EmbeddingIndex.from_features(tmp_path)
    g, _, ids, labels = _data(20, 4)
    _extraction(tmp_path, g.astype(np.float16), ids, labels, None, 20)
    with pytest.raises(EmbeddingIndexError, match="float16.*mmap=False"):
        fs.EmbeddingIndex.from_features(tmp_path)
    assert len(fs.EmbeddingIndex.from_features(tmp_path, mmap=False)) == 20


def _rss_anon() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def test_mapped_search_anonymous_memory_within_budget(tmp_path):
    # A 48 MiB gallery searched with a 2 MiB budget: the process's anonymous memory may grow
    # by the budget plus a small constant (allocator slack, thread stacks), not by the gallery.
    if not _rss_anon_available():
        pytest.skip("needs /proc/self/status")
    n, d, budget = 49152, 256, 2 * 2**20
    rng = np.random.default_rng(0)
    index = fs.EmbeddingIndex(d, memory_budget=budget)
    index.add(rng.standard_normal((n, d)).astype(np.float32))
    path = index.save(tmp_path / "big.safetensors")
    q = torch.from_numpy(rng.standard_normal((64, d)).astype(np.float32))
    expected = index.search(q, 10)
    del index
    mapped = fs.EmbeddingIndex.load(path, mmap=True)
    mapped.search(q, 10)  # warm up: worker threads, allocator arenas, BLAS buffers
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.0002)

    base = _rss_anon()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = mapped.search(q, 10)
    finally:
        stop.set()
        sampler.join()
    _same(result, expected)
    grown = peak[0] - base
    assert grown <= budget + 8 * 2**20 < n * d * 4 / 2, (grown, budget)


def _rss_anon_available() -> bool:
    try:
        _rss_anon()
    except (OSError, AssertionError):
        return False
    return True


def _mapped_index(tmp_path):
    index = fs.EmbeddingIndex(8)
    index.add(torch.randn(300, 8), ids=torch.arange(300) * 3)
    path = index.save(tmp_path / "m.safetensors")
    return index, path, fs.EmbeddingIndex.load(path, mmap=True)


def test_mapped_index_refuses_a_file_truncated_underneath(tmp_path):
    index, path, mapped = _mapped_index(tmp_path)
    q = torch.randn(2, 8)
    assert torch.equal(mapped.search(q, 3).ids, index.search(q, 3).ids)
    with open(path, "r+b") as fh:  # in place: the map now reaches past the end (SIGBUS)
        fh.truncate(path.stat().st_size // 2)
    with pytest.raises(IndexFileError, match="changed on disk since it was opened"):
        mapped.search(q, 3)
    with pytest.raises(IndexFileError, match=str(path.name)):
        mapped.vectors  # noqa: B018 - reading the rows is checked too


def test_mapped_index_refuses_a_file_overwritten_in_place(tmp_path):
    _, path, mapped = _mapped_index(tmp_path)
    data = bytearray(path.read_bytes())
    data[-100:] = bytes(100)
    st = path.stat()
    with open(path, "r+b") as fh:  # same size, new bytes
        fh.write(data)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # coarse clocks: mtime must move
    with pytest.raises(IndexFileError, match="load it again"):
        mapped.search(torch.randn(1, 8), 1)


def test_mapped_index_keeps_searching_its_file_when_a_new_one_replaces_it(tmp_path):
    index, path, mapped = _mapped_index(tmp_path)
    q = torch.randn(3, 8)
    other = fs.EmbeddingIndex(8)
    other.add(torch.randn(5, 8))
    other.save(path)  # atomic: a new file renamed over the path; the map keeps the old one
    assert torch.equal(mapped.search(q, 4).ids, index.search(q, 4).ids)
