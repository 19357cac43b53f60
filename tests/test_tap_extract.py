"""FeatureTap.extract: in memory and on disk, resumable, with labels, ids, paths and the hook."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import featurescope as fs
from _plugin_module import plugin_module
from featurescope.errors import FeaturescopeError
from featurescope.plugins import register_plugin, unregister_plugin
from featurescope.tap import FeatureTap, load_features, merge_features
from featurescope.tap import _store as _tap_store

NODES = {"features.0": "conv", "features": "pooled", "fc.1": "hidden", "fc": "logits"}


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(2)
        )
        self.fc = nn.Sequential(nn.Linear(16, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class Images(Dataset):
    """``(image, label)`` items; counts reads and can fail once at a given index."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = torch.arange(n) % 3
        self.fail_at = fail_at
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i == self.fail_at:
            self.fail_at = None
            raise RuntimeError("simulated interruption")
        self.reads += 1
        return self.x[i], int(self.y[i])


@pytest.fixture
def tap() -> FeatureTap:
    torch.manual_seed(0)
    return FeatureTap(TinyNet().eval(), NODES)


@pytest.fixture(autouse=True)
def _commit_every_batch(monkeypatch):
    # The writer may skip commits when they are costly; here every batch is committed.
    monkeypatch.setattr(_tap_store, "_COMMIT_COST_RATIO", 0.0)


def reference(tap: FeatureTap, data: Images) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy() for k, v in tap(data.x).items()}


def test_in_memory_matches_one_big_forward(tap):
    data = Images(10)
    result = tap.extract(data, batch_size=4, progress=False)
    ref = reference(tap, data)
    assert result.keys() == list(NODES.values())
    for alias in NODES.values():
        assert result[alias].dtype == np.float32
        np.testing.assert_allclose(result[alias], ref[alias], rtol=1e-5, atol=1e-6)
    assert (result["conv"] < 0).any()  # before the in-place ReLU
    np.testing.assert_array_equal(result.sample_ids, np.arange(10))
    np.testing.assert_array_equal(result.labels, data.y.numpy())
    assert result.paths is None and result.out is None and len(result) == 10


def test_shuffled_dataloader_rows_carry_their_sample_ids(tap):
    data = Images(11)
    loader = DataLoader(
        data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    result = tap.extract(loader, progress=False)
    assert sorted(result.sample_ids) == list(range(11))
    assert list(result.sample_ids) != list(range(11))
    ref = reference(tap, data)
    np.testing.assert_allclose(
        result["hidden"], ref["hidden"][result.sample_ids], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(result.labels, data.y.numpy()[result.sample_ids])


@pytest.mark.parametrize(
    ("reduce", "expected"),
    [
        ("avgpool", lambda a: a.mean(axis=tuple(range(2, a.ndim)))),
        ("flatten", lambda a: a.reshape(len(a), -1)),
        (lambda t: t.amax(dim=-1), lambda a: a.max(axis=-1)),
    ],
)
def test_reductions(tap, reduce, expected):
    data = Images(5)
    result = tap.extract(data, batch_size=2, reduce=reduce, progress=False)
    ref = reference(tap, data)
    for alias in NODES.values():
        np.testing.assert_allclose(result[alias], expected(ref[alias]), rtol=1e-5, atol=1e-6)


def test_unknown_reduction_and_bad_data_are_clear_errors(tap):
    with pytest.raises(FeaturescopeError, match="Did you mean: 'avgpool'"):
        tap.extract(Images(2), reduce="avgpol", progress=False)

    class Dicts(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 8, 8)}

    with pytest.raises(FeaturescopeError, match="tuple"):
        tap.extract(Dicts(), progress=False)
    with pytest.raises(FeaturescopeError, match="map-style"):
        tap.extract(iter([]), progress=False)  # type: ignore[arg-type]
    with pytest.raises(FeaturescopeError, match="model is on cpu, not on meta"):
        tap.extract(Images(2), device="meta", progress=False)


def test_image_folder_paths_and_labels(tmp_path, tap):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / cls / f"{i}.png")
    data = ImageFolder(tmp_path / "images", transform=ToTensor())
    result = tap.extract(data, batch_size=4, out=tmp_path / "out", progress=False)
    assert result.paths == [path for path, _ in data.samples]
    np.testing.assert_array_equal(result.labels, data.targets)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["paths"] == result.paths


def test_disk_round_trip_and_manifest(tmp_path, tap):
    data = Images(9)
    in_memory = tap.extract(data, batch_size=4, progress=False)
    on_disk = tap.extract(data, batch_size=4, out=tmp_path, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["completed"] == manifest["num_samples"] == 9
    assert manifest["model"] == "TinyNet" and manifest["preprocessing"] is None
    assert manifest["sample_ids"] == list(range(9))
    assert manifest["nodes"]["conv"] == {
        "node": "features.0",
        "file": "conv.npy",
        "shape": [4, 6, 6],
        "dtype": "float32",
    }
    assert manifest["nodes"]["pooled"]["node"] == "features.2"
    reloaded = load_features(tmp_path)
    for alias in NODES.values():
        np.testing.assert_array_equal(np.load(tmp_path / f"{alias}.npy"), in_memory[alias])
        np.testing.assert_array_equal(on_disk[alias], in_memory[alias])
        np.testing.assert_array_equal(reloaded[alias], in_memory[alias])
    np.testing.assert_array_equal(reloaded.labels, data.y.numpy())
    assert reloaded.nodes["logits"] == "fc.2"


def test_zoo_model_name_and_preprocessing_in_manifest(tmp_path):
    model = fs.create_model("alexnet_half").eval()
    data = TensorDataset(torch.randn(3, 3, 227, 227))
    result = FeatureTap(model, {"fc.4": "embedding"}).extract(
        data, batch_size=2, out=tmp_path, progress=False
    )
    manifest = result.manifest
    assert manifest is not None
    assert manifest["model"] == "alexnet_half"
    assert manifest["preprocessing"] == fs.get_model_info("alexnet_half").preprocessing.to_dict()
    assert manifest["labels"] is None and result.labels is None
    assert result["embedding"].shape == (3, 2048)


def test_interrupted_extraction_resumes_and_never_overclaims(tmp_path, tap):
    data = Images(10, fail_at=7)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        tap.extract(data, batch_size=3, out=tmp_path, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["completed"] == 6  # two whole batches were written before the failure
    ref = reference(tap, Images(10))
    partial = load_features(tmp_path)
    assert len(partial) == 6
    np.testing.assert_allclose(partial["hidden"], ref["hidden"][:6], rtol=1e-5, atol=1e-6)

    data.reads = 0
    result = tap.extract(data, batch_size=3, out=tmp_path, progress=False)
    # Only the rows not yet on disk were computed, plus one read of sample 0: without file
    # names, the data's fingerprint is that sample's content.
    assert data.reads == 4 + 1
    for alias in NODES.values():
        np.testing.assert_allclose(result[alias], ref[alias], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "manifest.json").read_text())["completed"] == 10

    data.reads = 0
    again = tap.extract(data, batch_size=3, out=tmp_path, progress=False)
    assert data.reads == 1  # complete already: nothing is recomputed, sample 0 re-checked
    np.testing.assert_array_equal(again["logits"], result["logits"])


def test_crash_between_writing_rows_and_commit_leaves_a_truthful_manifest(
    tmp_path, tap, monkeypatch
):
    commits = []
    original = _tap_store.ShardWriter.commit

    def commit_then_die(self):
        if len(commits) == 2:
            raise KeyboardInterrupt  # rows of the third batch are written, not yet committed
        commits.append(self.completed)
        original(self)

    monkeypatch.setattr(_tap_store.ShardWriter, "commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        tap.extract(Images(10), batch_size=2, out=tmp_path, progress=False)
    assert json.loads((tmp_path / "manifest.json").read_text())["completed"] == 4
    monkeypatch.setattr(_tap_store.ShardWriter, "commit", original)
    result = tap.extract(Images(10), batch_size=2, out=tmp_path, progress=False)
    np.testing.assert_allclose(
        result["conv"], reference(tap, Images(10))["conv"], rtol=1e-5, atol=1e-6
    )


def test_crash_before_the_first_commit_leaves_no_manifest(tmp_path, tap):
    with pytest.raises(RuntimeError):
        tap.extract(Images(4, fail_at=1), batch_size=2, out=tmp_path, progress=False)
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(FeaturescopeError, match="no manifest.json"):
        load_features(tmp_path)


def test_a_different_extraction_is_not_overwritten_by_accident(tmp_path, tap):
    tap.extract(Images(4), batch_size=2, out=tmp_path, progress=False)
    with pytest.raises(FeaturescopeError, match="different extraction.*overwrite=True"):
        tap.extract(Images(4), batch_size=2, out=tmp_path, reduce="avgpool", progress=False)
    result = tap.extract(
        Images(4), batch_size=2, out=tmp_path, reduce="avgpool", overwrite=True, progress=False
    )
    assert result["conv"].shape == (4, 4)
    assert load_features(tmp_path)["conv"].shape == (4, 4)


def test_progress_bar_runs(tap, capsys):
    tap.extract(Images(3), batch_size=2, progress=True)
    assert "extract:" in capsys.readouterr().err


def test_merge_without_shards_is_an_error(tmp_path):
    with pytest.raises(FeaturescopeError, match="no rank"):
        merge_features(tmp_path)


def test_a_failing_features_extracted_plugin_is_named_among_several(tap):
    calls = []
    quiet = plugin_module(featurescope_features_extracted=lambda features, info: calls.append(1))

    def broken(features, info):
        raise KeyError("no such column")

    names = [
        register_plugin(quiet, name="quiet-logger"),
        register_plugin(plugin_module(featurescope_features_extracted=broken), name="bad-logger"),
    ]
    try:
        with pytest.raises(fs.PluginError, match="plugin 'bad-logger' raised KeyError") as caught:
            tap.extract(Images(3), batch_size=2, progress=False)
    finally:
        for name in names:
            unregister_plugin(name)
    assert isinstance(caught.value.__cause__, KeyError)
    assert "featurescope_features_extracted" in str(caught.value)


def test_hook_featurescope_features_extracted(tmp_path, tap):
    calls = []
    plugin = plugin_module(
        featurescope_features_extracted=lambda features, info: calls.append((features, info))
    )
    name = register_plugin(plugin, name="test-features-extracted")
    try:
        result = tap.extract(Images(5), batch_size=2, out=tmp_path, progress=False)
    finally:
        unregister_plugin(name)
    assert len(calls) == 1
    features, info = calls[0]
    assert set(features) == set(NODES.values())
    np.testing.assert_array_equal(features["logits"], result["logits"])
    assert info["model"] == "TinyNet" and info["num_samples"] == 5
    assert info["nodes"]["conv"] == "features.0" and info["out"] == str(tmp_path)
    np.testing.assert_array_equal(info["sample_ids"], np.arange(5))
    # Exactly the keys the hook specification documents.
    assert set(info) == {
        "model",
        "nodes",
        "num_samples",
        "reduce",
        "out",
        "labels",
        "sample_ids",
        "paths",
        "rank",
        "world_size",
    }
    assert (info["rank"], info["world_size"]) == (0, 1)
    spec = fs.hookspecs.featurescope_features_extracted.__doc__
    assert all(f"``{key}``" in spec for key in info)


def test_resume_with_a_shuffling_loader_keeps_the_first_runs_order(tmp_path, tap):
    data = Images(9, fail_at=4)
    loader = DataLoader(data, batch_size=2, shuffle=True)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        tap.extract(loader, out=tmp_path, progress=False)
    first_order = json.loads((tmp_path / "manifest.json").read_text())["sample_ids"]
    result = tap.extract(loader, out=tmp_path, progress=False)  # the loader would draw anew
    assert list(result.sample_ids) == first_order
    assert sorted(first_order) == list(range(9))
    ref = reference(tap, Images(9))
    np.testing.assert_allclose(result["logits"], ref["logits"][first_order], rtol=1e-5, atol=1e-6)


def test_empty_dataset_is_a_clear_error(tap):
    with pytest.raises(FeaturescopeError, match="empty"):
        tap.extract(Images(0), progress=False)


class Files(Images):
    """``Images`` that name a file per sample, like an ``ImageFolder``'s ``samples``."""

    def __init__(self, n: int, seed: int, folder: str) -> None:
        super().__init__(n)
        self.x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        self.samples = [(f"{folder}/{i}.png", int(self.y[i])) for i in range(n)]


def test_overwrite_replaces_even_a_resumable_looking_extraction(tmp_path, tap):
    first, second = Files(4, seed=1, folder="a"), Files(4, seed=2, folder="b")
    tap.extract(first, batch_size=2, out=tmp_path, progress=False)
    with pytest.raises(FeaturescopeError, match="different extraction.*overwrite=True"):
        tap.extract(second, batch_size=2, out=tmp_path, progress=False)
    result = tap.extract(second, batch_size=2, out=tmp_path, overwrite=True, progress=False)
    ref = reference(tap, second)
    assert result.paths == [path for path, _ in second.samples]
    for alias in NODES.values():
        np.testing.assert_allclose(result[alias], ref[alias], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(load_features(tmp_path)[alias], ref[alias], atol=1e-6)

    # Same files, new values: nothing on disk tells them apart, but overwrite=True still
    # recomputes every row instead of handing back the complete old extraction.
    third = Files(4, seed=3, folder="b")
    result = tap.extract(third, batch_size=2, out=tmp_path, overwrite=True, progress=False)
    assert third.reads == 4
    np.testing.assert_allclose(result["logits"], reference(tap, third)["logits"], atol=1e-6)


def test_resume_checks_preprocessing(tmp_path, tap, monkeypatch):
    from featurescope.tap import _extract as _tap_extract

    tap.extract(Images(4), batch_size=2, out=tmp_path, progress=False)
    monkeypatch.setattr(
        _tap_extract, "_describe_model", lambda model: ("TinyNet", {"resize": 32, "crop": 8})
    )
    with pytest.raises(FeaturescopeError, match="different extraction"):
        tap.extract(Images(4), batch_size=2, out=tmp_path, progress=False)


def test_resume_refuses_rows_from_other_weights(tmp_path, tap):
    """Training between two runs must not mix two sets of weights' features in one folder."""
    data = Images(6, fail_at=3)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        tap.extract(data, batch_size=2, out=tmp_path, progress=False)
    with torch.no_grad():
        tap.model.fc[-1].weight.add_(0.5)  # "more training"
    with pytest.raises(FeaturescopeError, match="other weights.*overwrite=True"):
        tap.extract(Images(6), batch_size=2, out=tmp_path, progress=False)
    # The folder is untouched by the refusal, and overwrite=True starts afresh.
    before = json.loads((tmp_path / "manifest.json").read_text())
    assert before["completed"] < 6
    fresh = tap.extract(Images(6), batch_size=2, out=tmp_path, progress=False, overwrite=True)
    with torch.no_grad():
        expected = tap(torch.stack([Images(6)[i][0] for i in range(6)]))["logits"]
    np.testing.assert_allclose(fresh["logits"], expected.numpy(), rtol=1e-5, atol=1e-6)
    # Same weights again: it resumes (nothing to do) rather than refusing.
    again = tap.extract(Images(6), batch_size=2, out=tmp_path, progress=False)
    np.testing.assert_array_equal(again["logits"], fresh["logits"])


def test_resume_refuses_other_data_of_the_same_length(tmp_path, tap):
    """Without file names: the first sample's content tells the data apart."""
    first = Images(6, fail_at=3)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        tap.extract(first, batch_size=2, out=tmp_path, progress=False)
    other = Images(6)
    other.x = other.x + 1.0  # as many samples, other values
    with pytest.raises(FeaturescopeError, match="other data with as many samples.*overwrite=True"):
        tap.extract(other, batch_size=2, out=tmp_path, progress=False)
    # The same data resumes, and gives the one-forward reference.
    result = tap.extract(Images(6), batch_size=2, out=tmp_path, progress=False)
    np.testing.assert_allclose(result["logits"], reference(tap, Images(6))["logits"], atol=1e-6)


def test_resume_refuses_files_of_the_same_names_but_other_sizes(tmp_path, tap):
    """With file names: a file replaced by another of another size is other data."""
    folder = tmp_path / "photos"
    folder.mkdir()
    data = Files(4, seed=1, folder=str(folder))
    for i, (path, _) in enumerate(data.samples):
        Path(path).write_bytes(b"x" * (10 + i))
    out = tmp_path / "features"
    tap.extract(data, batch_size=2, out=out, progress=False)
    data.reads = 0
    tap.extract(data, batch_size=2, out=out, progress=False)
    assert data.reads == 0  # unchanged files: complete, and no sample is read to check it
    Path(data.samples[2][0]).write_bytes(b"y" * 99)
    with pytest.raises(FeaturescopeError, match="other data with as many samples"):
        tap.extract(data, batch_size=2, out=out, progress=False)
