"""Index files that parse but say the wrong thing: every one is an ``IndexFileError`` naming the
field (never a raw ``TypeError``, ``KeyError``, ``OverflowError`` or ``RecursionError``), or, when
the change is harmless, an index equal to the original."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import featurescope as fs
from featurescope.errors import EmbeddingIndexError, IndexFileError

CONFIG_KEYS = ("dim", "dtype", "metric", "memory_budget", "next_id", "count")
LAYOUT_FIELDS = ("dtype", "shape", "data_offsets")
DEEP = "[" * 50_000 + "]" * 50_000

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["float32", "bfloat16", "l2", "cosine", "F32", "I64"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
huge_ints = st.sampled_from([0, -1, 1, 2, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 10**30, -(2**63)])


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    index = fs.EmbeddingIndex(3)
    index.add(
        torch.arange(12.0).reshape(4, 3),
        ids=[4, 5, 6, 7],
        labels=[0, 1, 0, 1],
        metadata=["a", None, "c", "d"],
    )
    path = tmp_path_factory.mktemp("fuzz") / "ok.safetensors"
    index.save(path)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return index, json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write(path, layout, data, header_text=None):
    text = json.dumps(layout) if header_text is None else header_text
    body = text.encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _load_both(path, index):
    """Each loader either refuses with IndexFileError or gives back the original index."""
    for mmap in (False, True):
        try:
            loaded = fs.EmbeddingIndex.load(path, mmap=mmap)
        except IndexFileError:
            continue
        assert torch.equal(loaded.vectors, index.vectors)
        assert torch.equal(loaded.ids, index.ids)
        assert loaded.metadata == index.metadata
        q = torch.tensor([[1.0, 2.0, 3.5]])
        assert torch.equal(loaded.search(q, 2).ids, index.search(q, 2).ids)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=st.sampled_from(CONFIG_KEYS), value=json_values | huge_ints, drop=st.booleans())
def test_config_fields_of_any_type_or_size(original, tmp_path, key, value, drop):
    index, layout, data = original
    layout = json.loads(json.dumps(layout))
    config = json.loads(layout["__metadata__"]["config"])
    if drop:
        config.pop(key)
    else:
        config[key] = value
    layout["__metadata__"]["config"] = json.dumps(config)
    _write(tmp_path / "f.safetensors", layout, data)
    _load_both(tmp_path / "f.safetensors", index)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(["vectors", "ids", "labels", "metadata", "__metadata__"]),
    field=st.sampled_from(LAYOUT_FIELDS),
    value=json_values | huge_ints | st.lists(huge_ints, max_size=3),
)
def test_safetensors_layout_of_any_type_or_size(original, tmp_path, name, field, value):
    index, layout, data = original
    layout = json.loads(json.dumps(layout))
    if name == "__metadata__":
        layout[name] = value
    else:
        layout[name][field] = value
    _write(tmp_path / "f.safetensors", layout, data)
    _load_both(tmp_path / "f.safetensors", index)


@pytest.mark.parametrize("where", ["config", "layout", "metadata"])
def test_deeply_nested_json_is_refused(original, tmp_path, where):
    _, layout, data = original
    layout = json.loads(json.dumps(layout))
    path = tmp_path / "deep.safetensors"
    if where == "config":
        layout["__metadata__"]["config"] = DEEP
        _write(path, layout, data)
    elif where == "layout":
        _write(path, layout, data, header_text=json.dumps(layout)[:-1] + ', "x": ' + DEEP + "}")
    else:
        layout["__metadata__"]["format"] = "featurescope-index/1"
        _write(path, layout, data)
        # Metadata strings are a tensor under the checksum: rebuild a consistent forged file.
        forged = fs.EmbeddingIndex(3)
        forged.add(torch.zeros(1, 3), metadata=["x"])
        forged.save(path)
        from featurescope.index import _persist

        tensors = {
            "vectors": torch.zeros(1, 3),
            "ids": torch.tensor([0]),
            "labels": torch.tensor([-1]),
            "metadata": torch.frombuffer(bytearray(DEEP.encode()), dtype=torch.uint8),
        }
        header = json.loads(
            path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]]
        )
        meta = header["__metadata__"]
        meta["sha256"] = _persist._digest(tensors)
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=meta)
    for mmap in (False, True):
        with pytest.raises(IndexFileError):
            fs.EmbeddingIndex.load(path, mmap=mmap)


def test_an_empty_index_cannot_ask_for_a_huge_dimension(tmp_path):
    # No rows to check the dimension against: opening would allocate 8 GiB for the centre.
    config = {
        "dim": 2**31 - 1,
        "dtype": "float32",
        "metric": "l2",
        "memory_budget": 2**28,
        "next_id": 0,
        "count": 0,
    }
    meta = {"format": "featurescope-index/1", "config": json.dumps(config)}
    empty = {"vectors": [0, 2**31 - 1], "ids": [0], "labels": [0], "metadata": [2]}
    forged = {"__metadata__": meta}
    for name, shape in empty.items():
        dtype = {"vectors": "F32", "metadata": "U8"}.get(name, "I64")
        end = 2 if name == "metadata" else 0
        forged[name] = {"dtype": dtype, "shape": shape, "data_offsets": [0, end]}
    path = tmp_path / "huge.safetensors"
    _write(path, forged, b"[]")
    for mmap in (False, True):
        with pytest.raises(IndexFileError, match="field 'dim' must be an integer in"):
            fs.EmbeddingIndex.load(path, mmap=mmap)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("nodes", 5, "field 'nodes' must be an object"),
        ("nodes", {"fc7": {"file": "../outside.npy"}}, "a file name in the folder"),
        ("completed", 10**30, "field 'completed' must be a non-negative integer"),
        ("completed", 4, "field 'sample_ids' must be a list of at least 4 integers"),
        ("sample_ids", [4, 5], "field 'sample_ids' must be a list of at least 3 integers"),
        ("labels", "/etc/passwd", "field 'labels' must be null or a file name in the folder"),
        ("labels", 2, "field 'labels' must be null or a file name"),
        ("paths", {"a": 1}, "field 'paths' must be null or a list of at least 3 paths"),
    ],
)
def test_extraction_manifest_fields_are_checked(tmp_path, field, value, message):
    np.save(tmp_path / "fc7.npy", np.eye(3, dtype=np.float32))
    manifest = {
        "format": "featurescope.features",
        "nodes": {"fc7": {"file": "fc7.npy"}},
        "completed": 3,
        "sample_ids": [4, 5, 6],
        "labels": None,
        "paths": None,
    }
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, field: value}))
    for mmap in (True, False):
        with pytest.raises(EmbeddingIndexError, match=message):
            fs.EmbeddingIndex.from_features(tmp_path, mmap=mmap)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert fs.EmbeddingIndex.from_features(tmp_path).ids.tolist() == [4, 5, 6]


def test_extraction_manifest_cannot_count_rows_the_file_lacks(tmp_path):
    np.save(tmp_path / "fc7.npy", np.eye(3, dtype=np.float32))
    manifest = {
        "format": "featurescope.features",
        "nodes": {"fc7": {"file": "fc7.npy"}},
        "completed": 4,
        "sample_ids": [4, 5, 6, 7],
        "labels": None,
        "paths": None,
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for mmap in (True, False):
        with pytest.raises(
            EmbeddingIndexError, match="counts 4 completed rows but fc7.npy holds 3"
        ):
            fs.EmbeddingIndex.from_features(tmp_path, mmap=mmap)
