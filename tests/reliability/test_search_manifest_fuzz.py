"""A saved ImageSearch whose ``search.json`` parses but says the wrong thing: loading raises an
``IndexFileError`` naming the field, or (for a harmless change) loads; never a raw error."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import featurescope as fs
from featurescope.errors import FeaturescopeError, IndexFileError
from featurescope.study._search_manifest import MAX_SIDE, check_manifest

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=5,
)


@pytest.fixture(scope="module")
def saved(image_search, tmp_path_factory):
    folder = image_search.save(tmp_path_factory.mktemp("fuzz") / "s.fsindex")
    return folder, json.loads((folder / "search.json").read_text())


@pytest.mark.slow
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), value=json_values, drop=st.booleans())
def test_any_field_of_any_type(saved, data, value, drop):
    folder, manifest = saved
    manifest = json.loads(json.dumps(manifest))
    key = data.draw(st.sampled_from(sorted({*manifest, "preprocessing.crop", "preprocessing.std"})))
    target, field = (
        (manifest["preprocessing"], key.split(".")[1]) if "." in key else (manifest, key)
    )
    if drop:
        target.pop(field, None)
    else:
        target[field] = value
    (folder / "search.json").write_text(json.dumps(manifest))
    failure: Exception | None = None
    try:
        fs.ImageSearch.load(folder)
    except IndexFileError:
        pass
    except FeaturescopeError as exc:
        failure = exc
    finally:
        (folder / "search.json").write_text(json.dumps(saved[1]))
    # Only a model name or weights the zoo does not know may fail past the manifest check.
    assert failure is None or field in ("model", "weights", "num_classes"), (field, failure)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"paths": None}, "field 'paths' must be a list of strings or nulls, got None"),
        (
            {"preprocessing": {"resize": 256, "crop": 60000, "mean": [0, 0, 0], "std": [1, 1, 1]}},
            f"field 'preprocessing.crop' must be an integer in 1..{MAX_SIDE}, got 60000",
        ),
        (
            {"preprocessing": {"resize": 256, "crop": 8, "mean": [0, 0, 0], "std": [1, 0, 1]}},
            "'preprocessing.std' must be 3 positive finite numbers",
        ),
        ({"skipped": [["a.png"]]}, "field 'skipped' must be a list of \\[path, reason\\] pairs"),
        ({"class_names": "cat"}, "field 'class_names' must be a list of strings"),
        ({"root": 3}, "field 'root' must be a folder path or null, got 3"),
        ({"checkpoint": "../model.safetensors"}, "field 'checkpoint' must be a file name or null"),
    ],
)
def test_check_manifest_names_the_field(change, message, tmp_path):
    manifest = {
        "index": "index.safetensors",
        "checkpoint": None,
        "model": "alexnet",
        "node": "fc.4",
        "paths": ["a.png"],
        "preprocessing": {"resize": 8, "crop": 8, "mean": [0, 0, 0], "std": [1, 1, 1]},
    }
    check_manifest(tmp_path / "search.json", dict(manifest))
    with pytest.raises(IndexFileError, match=message):
        check_manifest(tmp_path / "search.json", {**manifest, **change})
    required = dict(manifest)
    del required["node"]
    with pytest.raises(IndexFileError, match="field 'node' is missing"):
        check_manifest(tmp_path / "search.json", required)
