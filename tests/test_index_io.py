"""EmbeddingIndex.save / load: round trips keep everything; bad files raise IndexFileError."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import featurescope as fs
from featurescope.errors import IndexFileError


def _index(dtype=torch.float32, n=40, d=5):
    rng = np.random.default_rng(0)
    index = fs.EmbeddingIndex(d, dtype=dtype, memory_budget=1 << 22)
    index.add(rng.standard_normal((n, d)).astype(np.float32), ids=rng.permutation(1000)[:n])
    index.add(
        rng.standard_normal((3, d)).astype(np.float32),
        labels=[1, 2, 3],
        metadata=["cat.png", None, "ünïcødé/dög.jpg"],
    )
    return index


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_keeps_everything(tmp_path, dtype):
    index = _index(dtype)
    path = index.save(tmp_path / "gallery.safetensors")
    again = fs.EmbeddingIndex.load(path)
    assert (again.dim, again.dtype, again.memory_budget) == (index.dim, dtype, index.memory_budget)
    assert torch.equal(again.vectors, index.vectors)
    assert torch.equal(again.ids, index.ids)
    assert torch.equal(again.labels, index.labels)
    assert again.metadata == index.metadata
    q = torch.randn(6, 5)
    a, b = index.search(q, 4), again.search(q, 4)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.distances, b.distances)
    # Automatic ids continue where the saved index left off.
    again.add(torch.zeros(1, 5))
    index.add(torch.zeros(1, 5))
    assert again.ids[-1] == index.ids[-1]


def test_round_trip_empty_index(tmp_path):
    path = fs.EmbeddingIndex(3).save(tmp_path / "empty.safetensors")
    again = fs.EmbeddingIndex.load(path, memory_budget=1 << 20)
    assert len(again) == 0 and again.dim == 3 and again.memory_budget == 1 << 20


def test_save_is_atomic_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "i.safetensors"
    _index().save(path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _index(n=7).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["i.safetensors"]


def test_missing_file(tmp_path):
    with pytest.raises(IndexFileError, match="does not exist"):
        fs.EmbeddingIndex.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("keep", [0, 7, 100, -50, -1])
def test_truncated_file(tmp_path, keep):
    path = _index().save(tmp_path / "i.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[: len(data) + keep])
    with pytest.raises(IndexFileError):
        fs.EmbeddingIndex.load(path)


def test_flipped_byte_in_vectors_is_detected(tmp_path):
    path = _index().save(tmp_path / "i.safetensors")
    data = bytearray(path.read_bytes())
    data[-200] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="checksum|metadata|corrupt"):
        fs.EmbeddingIndex.load(path)


def test_random_bytes_and_foreign_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(IndexFileError):
        fs.EmbeddingIndex.load(junk)
    foreign = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(IndexFileError, match="not a featurescope index"):
        fs.EmbeddingIndex.load(foreign)
    pickle_file = tmp_path / "model.pt"
    torch.save({"a": 1}, pickle_file)
    with pytest.raises(IndexFileError):
        fs.EmbeddingIndex.load(pickle_file)


def _rewrite(path, tensors=None, **header_changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    loaded = load_file(str(path))
    loaded.update(tensors or {})
    header.update(header_changes)
    save_file(loaded, str(path), metadata=header)


def test_consistent_but_wrong_contents_are_refused(tmp_path):
    path = _index().save(tmp_path / "i.safetensors")
    _rewrite(path, format="featurescope-index/99")
    with pytest.raises(IndexFileError, match="featurescope-index/99"):
        fs.EmbeddingIndex.load(path)

    path = _index().save(tmp_path / "j.safetensors")
    _rewrite(path, config="{not json")
    with pytest.raises(IndexFileError, match="configuration"):
        fs.EmbeddingIndex.load(path)

    path = _index().save(tmp_path / "k.safetensors")
    _rewrite(path, tensors={"ids": torch.zeros(43, dtype=torch.int64)})
    with pytest.raises(IndexFileError, match="checksum"):
        fs.EmbeddingIndex.load(path)

    path = _index().save(tmp_path / "l.safetensors")
    _rewrite(path, tensors={"vectors": torch.zeros(43, 5, dtype=torch.float64)})
    with pytest.raises(IndexFileError, match="dtype"):
        fs.EmbeddingIndex.load(path)

    path = _index().save(tmp_path / "m.safetensors")
    config = json.dumps(
        {"dim": 5, "count": 44, "memory_budget": 1 << 22, "next_id": 0, "dtype": "float32"}
    )
    _rewrite(path, config=config)
    with pytest.raises(IndexFileError, match="shape"):
        fs.EmbeddingIndex.load(path)


def test_file_names_that_are_not_utf8_round_trip(tmp_path):
    import os

    name = os.fsdecode(b"photos/caf\xe9.png")  # a Latin-1 name, as os.listdir gives it
    index = fs.EmbeddingIndex(3)
    index.add(torch.eye(3), metadata=[name, "<!--<script>.png", "ok.png"])
    again = fs.EmbeddingIndex.load(index.save(tmp_path / "i.safetensors"))
    assert again.metadata == index.metadata
    assert os.fsencode(again.metadata[0]) == b"photos/caf\xe9.png"
