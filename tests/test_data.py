"""The bundled synthetic dataset and the image-folder loader."""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import featurescope as fs
from featurescope.data import (
    NO_LABEL,
    SYNTHETIC_CLASSES,
    EmptyDatasetError,
    ImageFolder,
    SkippedFilesWarning,
    load_image_folders,
    load_rgb,
    make_synthetic_dataset,
    synthetic_image,
    train_transform,
)
from featurescope.data.synthetic import MANIFEST, default_data_dir

TINY = {"train_per_class": 3, "val_per_class": 2, "test_per_class": 1, "size": 32}


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "tiny", **TINY)


# --- the synthetic dataset -------------------------------------------------------------------


def test_same_seed_gives_byte_identical_datasets(tmp_path: Path, tiny_root: Path) -> None:
    again = make_synthetic_dataset(tmp_path / "again", **TINY)
    assert _file_hashes(again) == _file_hashes(tiny_root)
    assert len(_file_hashes(again)) == 5 * (3 + 2 + 1)


def test_different_seeds_give_different_images(tmp_path: Path, tiny_root: Path) -> None:
    other = make_synthetic_dataset(tmp_path / "other", **{**TINY, "seed": 1})
    a, b = _file_hashes(tiny_root), _file_hashes(other)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_layout_and_class_balance(tiny_root: Path) -> None:
    splits = load_image_folders(tiny_root)
    assert splits.classes == list(SYNTHETIC_CLASSES)
    assert splits.test is not None
    for data, per_class in ((splits.train, 3), (splits.val, 2), (splits.test, 1)):
        assert data is not None
        assert data.class_counts() == dict.fromkeys(SYNTHETIC_CLASSES, per_class)
    for path, label in splits.train.samples:
        assert Path(path).parent.name == SYNTHETIC_CLASSES[label]
        with Image.open(path) as img:
            assert img.size == (32, 32)
            assert img.mode == "RGB"


def test_image_is_independent_of_split_sizes(tmp_path: Path, tiny_root: Path) -> None:
    bigger = make_synthetic_dataset(tmp_path / "bigger", **{**TINY, "train_per_class": 5})
    small, big = _file_hashes(tiny_root), _file_hashes(bigger)
    assert all(big[k] == v for k, v in small.items())
    assert len(big) == len(small) + 5 * 2


def test_complete_copy_is_reused_and_a_damaged_one_redrawn(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "d", **TINY)
    victim = next(iter(sorted(root.rglob("*.png"))))
    stamp = victim.stat().st_mtime_ns
    assert make_synthetic_dataset(root, **TINY) == root
    assert victim.stat().st_mtime_ns == stamp  # reused, not drawn again

    original = victim.read_bytes()
    victim.write_bytes(b"garbage")
    make_synthetic_dataset(root, **TINY)
    assert victim.read_bytes() == original
    assert json.loads((root / MANIFEST).read_text())["params"]["size"] == 32


def test_other_parameters_redraw_in_place(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "d", **TINY)
    make_synthetic_dataset(root, **{**TINY, "test_per_class": 0})
    assert not (root / "test").exists()
    assert len(list(root.rglob("*.png"))) == 5 * (3 + 2)


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(fs.FeaturescopeError, match="refusing to overwrite"):
        make_synthetic_dataset(tmp_path / "mine", **TINY)
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


def test_default_location_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATURESCOPE_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    root = make_synthetic_dataset(**TINY)
    assert root.parent == tmp_path
    assert root.name.startswith("synthetic-v1")


@pytest.mark.parametrize(
    "bad", [{"size": 4}, {"train_per_class": 0}, {"val_per_class": -1}, {"seed": 1.5}]
)
def test_bad_parameters(tmp_path: Path, bad: dict[str, object]) -> None:
    with pytest.raises(fs.FeaturescopeError):
        make_synthetic_dataset(tmp_path / "x", **{**TINY, **bad})  # type: ignore[arg-type]


@given(shape=st.sampled_from(SYNTHETIC_CLASSES), seed=st.integers(0, 2**32 - 1))
def test_synthetic_image_is_a_pure_function_of_its_rng(shape: str, seed: int) -> None:
    a = synthetic_image(shape, np.random.default_rng(seed), size=24)
    b = synthetic_image(shape, np.random.default_rng(seed), size=24)
    assert a.size == (24, 24)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_class_hues_overlap_so_colour_alone_does_not_decide() -> None:
    """Each class leans to its own hue, but a nearest-hue guess is often wrong."""
    from featurescope.data.synthetic import _HUE_SPREAD, _class_colour

    assert _HUE_SPREAD is not None
    n_classes = len(SYNTHETIC_CLASSES)
    rng = np.random.default_rng(0)
    right = 0
    trials = 400
    for i in range(trials):
        label = i % n_classes
        r, g, b = (v / 255 for v in _class_colour(rng, label, _HUE_SPREAD))
        hue = colorsys.rgb_to_hsv(r, g, b)[0]
        distance = [min(abs(hue - k / n_classes), 1 - abs(hue - k / n_classes)) for k in range(5)]
        right += int(np.argmin(distance) == label)
    assert 0.6 < right / trials < 0.95


# --- image folders ---------------------------------------------------------------------------


def test_items_are_study_tensors_and_labels(tiny_root: Path) -> None:
    data = ImageFolder(tiny_root / "train")
    image, label = data[0]
    assert isinstance(image, torch.Tensor)
    assert image.shape == (3, 227, 227)
    assert label == data.samples[0][1] == data.targets[0]
    reference = fs.data.STUDY_PREPROCESSING.transform()(
        Image.open(data.samples[0][0]).convert("RGB")
    )
    assert torch.equal(image, reference)
    assert data.paths == [p for p, _ in data.samples]


def test_agrees_with_torchvision_image_folder(tiny_root: Path) -> None:
    from torchvision.datasets import ImageFolder as TVImageFolder

    ours, theirs = ImageFolder(tiny_root / "val"), TVImageFolder(str(tiny_root / "val"))
    assert ours.classes == theirs.classes
    assert ours.class_to_idx == theirs.class_to_idx
    assert ours.samples == theirs.samples


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmptyDatasetError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(EmptyDatasetError, match="does not exist"):
        load_image_folders(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):  # also the built-in a Python user would catch
        load_image_folders(tmp_path / "nope")


def test_folder_without_train_split_names_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "cats").mkdir()
    with pytest.raises(EmptyDatasetError, match=r"no 'train' folder.*\['cats'\]"):
        load_image_folders(tmp_path)


def test_empty_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(EmptyDatasetError, match=r"no readable image.*expected images in it"):
        ImageFolder(tmp_path)
    with pytest.raises(EmptyDatasetError, match="no class subfolders"):
        ImageFolder(tmp_path, labels=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(EmptyDatasetError, match=r"1 image\(s\) directly.*labels=False"):
        ImageFolder(tmp_path, labels=True)
    (tmp_path / "loose.png").unlink()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    with (
        pytest.warns(SkippedFilesWarning, match=r"notes.txt \(not an image file \(.txt\)\)"),
        pytest.raises(EmptyDatasetError, match=r"no readable image in class folders \['a'\]"),
    ):
        ImageFolder(tmp_path)


def test_corrupt_images_are_skipped_with_a_count(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (40, 30), (i * 90, 0, 0)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "a" / "zero.jpg").write_bytes(b"")
    good = tmp_path / "b" / "0.png"
    (tmp_path / "b" / "truncated.png").write_bytes(good.read_bytes()[:60])
    buf = tmp_path / "full.jpg"
    Image.new("RGB", (64, 64), "blue").save(buf, quality=95)
    (tmp_path / "b" / "truncated.jpg").write_bytes(buf.read_bytes()[:-200])
    buf.unlink()

    with pytest.warns(fs.FeaturescopeWarning, match="skipped 3 of 7 files"):
        data = ImageFolder(tmp_path)
    assert data.num_skipped == 3
    assert sorted(Path(p).name for p, _ in data.skipped) == [
        "truncated.jpg",
        "truncated.png",
        "zero.jpg",
    ]
    assert len(data) == 4
    assert all(data[i][0].shape == (3, 227, 227) for i in range(len(data)))


def test_splits_share_the_training_classes(tmp_path: Path) -> None:
    for split, classes in (("train", ("x", "y", "z")), ("test", ("z",))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (10, 10)).save(tmp_path / split / c / "0.png")
    splits = load_image_folders(tmp_path)
    assert splits.val is None
    assert splits.test is not None
    assert splits.eval is splits.test  # the study validated on its test split
    assert splits.test.samples[0][1] == 2
    assert splits.test.class_counts() == {"x": 0, "y": 0, "z": 1}

    (tmp_path / "test" / "w").mkdir()
    Image.new("RGB", (10, 10)).save(tmp_path / "test" / "w" / "0.png")
    with pytest.raises(fs.FeaturescopeError, match="same class names"):
        load_image_folders(tmp_path)


def test_val_fraction_holds_out_part_of_each_training_class(
    tiny_root: Path, tmp_path: Path
) -> None:
    only_train = tmp_path / "only"
    shutil.copytree(tiny_root / "train", only_train / "train")
    held = load_image_folders(only_train, val_fraction=0.34, seed=3)
    assert held.val is not None
    assert held.val.class_counts() == dict.fromkeys(SYNTHETIC_CLASSES, 1)
    assert held.train.class_counts() == dict.fromkeys(SYNTHETIC_CLASSES, 2)
    assert set(held.train.paths).isdisjoint(held.val.paths)
    assert held.val[0][0].shape == (3, 227, 227)
    again = load_image_folders(only_train, val_fraction=0.34, seed=3)
    assert again.val is not None
    assert again.val.paths == held.val.paths
    # An existing root/val wins over val_fraction.
    splits = load_image_folders(tiny_root, val_fraction=0.34)
    assert splits.val is not None
    assert splits.val.class_counts() == dict.fromkeys(SYNTHETIC_CLASSES, 2)


def test_train_transform_keeps_the_geometry() -> None:
    image = synthetic_image("cross", np.random.default_rng(0), size=64)
    torch.manual_seed(0)
    a = train_transform()(image)
    plain = train_transform(flip=False, random_crop=False)(image)
    assert a.shape == plain.shape == (3, 227, 227)
    assert torch.equal(plain, fs.data.STUDY_PREPROCESSING.transform()(image))


def _one_class_sizes(root: Path, sizes: dict[str, int]) -> Path:
    for name, n in sizes.items():
        (root / "train" / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / "train" / name / f"{i}.png")
    return root


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_val_fraction_never_leaves_a_split_empty(tmp_path: Path, fraction: float) -> None:
    root = _one_class_sizes(tmp_path, {"a": 2, "b": 2, "c": 1})
    splits = load_image_folders(root, val_fraction=fraction, verify=False)
    assert splits.val is not None
    # Each class of two images gives exactly one to each split; a lone image stays in train.
    assert splits.val.class_counts() == {"a": 1, "b": 1, "c": 0}
    assert splits.train.class_counts() == {"a": 1, "b": 1, "c": 1}


def test_val_fraction_with_only_single_image_classes_is_a_clear_error(tmp_path: Path) -> None:
    root = _one_class_sizes(tmp_path, {"a": 1, "b": 1})
    with pytest.raises(EmptyDatasetError, match="validation split is empty"):
        load_image_folders(root, val_fraction=0.5, verify=False)


def test_empty_dataset_error_lives_in_errors() -> None:
    from featurescope import errors

    assert EmptyDatasetError is errors.EmptyDatasetError
    assert "EmptyDatasetError" in errors.__all__
    assert issubclass(EmptyDatasetError, fs.FeaturescopeError)
    assert issubclass(EmptyDatasetError, FileNotFoundError)


# --- any image folder ----------------------------------------------------------------------------


def _pil(image: Image.Image) -> Image.Image:
    return image


def _write_images(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Small distinct RGB images at ``folder/name``; returns their pixels by relative name."""
    pixels = {}
    for i, name in enumerate(names):
        arr = np.zeros((6, 8, 3), np.uint8)
        arr[..., 0], arr[..., 1], arr[:, : i + 1, 2] = 20 * i, 255 - 20 * i, 200
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)
        pixels[name] = arr
    return pixels


@pytest.mark.parametrize("labels", [None, False])
def test_flat_folder_without_classes(tmp_path: Path, labels: bool | None) -> None:
    pixels = _write_images(tmp_path, ["b.png", "a.png", "c.bmp"])
    data = ImageFolder(tmp_path, _pil, labels=labels)
    assert data.classes == [] and data.class_to_idx == {} and not data.labelled
    assert data.paths == [str(tmp_path / n) for n in ("a.png", "b.png", "c.bmp")]
    assert data.targets == [NO_LABEL] * 3 and data.class_counts() == {}
    for i, name in enumerate(("a.png", "b.png", "c.bmp")):
        image, label = data[i]
        assert label == -1
        np.testing.assert_array_equal(np.asarray(image), pixels[name])
    assert "no classes" in repr(data)


def test_nested_folder_without_classes_is_read_recursively(tmp_path: Path) -> None:
    names = ["top.png", "2024/06/x.png", "2024/y.png", "2025/z.png"]
    _write_images(tmp_path, names)
    (tmp_path / ".cache").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / ".cache" / "hidden.png")
    # Images directly in root: no classes, whatever the subfolders are called.
    data = ImageFolder(tmp_path)
    assert sorted(data.paths) == sorted(str(tmp_path / n) for n in names)
    assert set(data.targets) == {NO_LABEL}
    # Subfolders only: classes by default, no classes when asked.
    (tmp_path / "top.png").unlink()
    assert ImageFolder(tmp_path).classes == ["2024", "2025"]
    flat = ImageFolder(tmp_path, labels=False)
    assert len(flat) == 3 and flat.classes == []
    with pytest.raises(fs.FeaturescopeError, match="labels=False"):
        ImageFolder(tmp_path, labels=False, classes=["2024"])


def test_class_subfolders_still_give_labels_at_any_depth(tmp_path: Path) -> None:
    _write_images(tmp_path, ["cat/a.png", "cat/indoor/b.png", "dog/c.png"])
    data = ImageFolder(tmp_path, _pil)
    assert data.classes == ["cat", "dog"] and data.labelled
    assert [(Path(p).relative_to(tmp_path).as_posix(), y) for p, y in data.samples] == [
        ("cat/a.png", 0),
        ("cat/indoor/b.png", 0),
        ("dog/c.png", 1),
    ]


def test_unreadable_files_are_skipped_counted_and_listed_in_one_warning(tmp_path: Path) -> None:
    _write_images(tmp_path, ["ok.png", "sub/ok2.png"])
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "sub" / "README").write_text("no extension")
    with pytest.warns(SkippedFilesWarning) as record:
        data = ImageFolder(tmp_path)
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(f"skipped 3 of 5 files in {tmp_path} (not readable images): ")
    for listed in ("notes.txt (not an image file (.txt))", "README (not an image file (no "):
        assert listed in message
    # PIL's reason names the file again; the listing names it once, relative to the folder.
    assert "sub/broken.jpg (UnidentifiedImageError: cannot identify image file)" in message
    assert str(tmp_path / "sub") not in message and "\n" not in message
    assert sorted(Path(p).name for p, _ in data.skipped) == ["README", "broken.jpg", "notes.txt"]
    assert len(data) == 2 and data.num_skipped == 3


def test_a_long_list_of_skipped_files_is_cut_in_the_warning_not_in_skipped(tmp_path: Path) -> None:
    _write_images(tmp_path, ["ok.png"])
    for i in range(25):
        (tmp_path / f"note{i:02d}.txt").write_text("x")
    with pytest.warns(SkippedFilesWarning, match=r"skipped 25 .*note19.txt.*; and 5 more$"):
        data = ImageFolder(tmp_path)
    assert data.num_skipped == 25


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored landscape, 32 wide and 16 high: left half red, right half blue. Orientation 6
    # means "rotate 90 degrees clockwise to display": upright it is 16 wide, 32 high, red on top.
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, :16] = (255, 0, 0)
    stored[:, 16:] = (0, 0, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "portrait.jpg", exif=exif, quality=100)
    upright = np.asarray(load_rgb(tmp_path / "portrait.jpg"), dtype=np.int64)
    expected = np.rot90(stored, k=-1).astype(np.int64)  # clockwise
    assert upright.shape == (32, 16, 3)
    away_from_edge = np.r_[0:12, 20:32]  # JPEG blurs the edge between the halves (row 16)
    assert np.abs(upright - expected)[away_from_edge].max() < 12
    data = ImageFolder(tmp_path, _pil)
    assert data[0][0].size == (16, 32)


def test_grey_palette_transparent_and_16_bit_images_become_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    alpha = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    deep = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (5, 7), dtype=np.uint8)

    def over_white(colour: np.ndarray, a: np.ndarray) -> np.ndarray:
        weight = a[..., None].astype(np.float64) / 255.0
        return colour.astype(np.float64) * weight + 255.0 * (1.0 - weight)

    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(deep).save(tmp_path / "deep.png")
    p = Image.fromarray(index, "P")
    p.putpalette(palette.flatten().tolist())
    p.save(tmp_path / "p.png")
    p.save(tmp_path / "p_transparent.png", transparency=int(index[0, 0]))
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")

    expected = {
        "l.png": np.repeat(grey[..., None], 3, axis=2).astype(np.float64),
        "la.png": over_white(np.repeat(grey[..., None], 3, axis=2), alpha),
        "rgba.png": over_white(rgb, alpha),
        "deep.png": np.repeat(np.rint(deep / 257.0)[..., None], 3, axis=2),
        "p.png": palette[index].astype(np.float64),
        "p_transparent.png": np.where(
            (index == index[0, 0])[..., None], 255.0, palette[index].astype(np.float64)
        ),
    }
    data = ImageFolder(tmp_path, _pil)
    assert len(data) == len(expected)
    for path, image in zip(data.paths, (data[i][0] for i in range(len(data))), strict=True):
        assert image.mode == "RGB"
        got = np.asarray(image, dtype=np.float64)
        np.testing.assert_allclose(got, expected[Path(path).name], atol=1.0, err_msg=path)
    # 16-bit values are scaled, not clipped: PIL's own convert would give 255 almost everywhere.
    assert np.asarray(data[data.paths.index(str(tmp_path / "deep.png"))][0]).std() > 30


def test_load_image_folders_takes_an_unlabelled_train_split(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", [f"{i}.png" for i in range(5)])
    splits = load_image_folders(tmp_path, transform=_pil, val_fraction=0.4)
    assert splits.classes == []
    assert len(splits.train) == 3 and len(splits.val) == 2
    assert set(splits.train.targets) | set(splits.val.targets) == {NO_LABEL}
    assert not set(splits.train.paths) & set(splits.val.paths)


def test_load_image_folders_splits_without_classes(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", ["a.png", "b.png", "c/d.png"])
    _write_images(
        tmp_path / "val", ["e/f.png"]
    )  # a subfolder, but the training split has no classes
    _write_images(tmp_path / "test", ["g.png"])
    splits = load_image_folders(tmp_path, transform=_pil)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 1, 1)
    assert splits.val.classes == [] and splits.val.targets == [NO_LABEL]


# --- files and folders as they come ----------------------------------------------------------


def _within(seconds: float, call: Any) -> Any:
    """``call()``, or a test failure if it has not returned after ``seconds`` (not a hang)."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # handed to the test thread below
            errors.append(exc)

    worker = threading.Thread(target=run, daemon=True)  # a hung worker must not block exit
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail(f"still running after {seconds} s: it hangs")
    if errors:
        raise errors[0]
    return result[0]


def _three_images(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(root / f"{i}.png")
    return root


def test_a_symbolic_link_loop_is_walked_once_and_listed(tmp_path: Path) -> None:
    root = _three_images(tmp_path / "photos")
    (root / "self").symlink_to(".")
    with pytest.warns(SkippedFilesWarning, match=r"self \(a symbolic link to a folder already"):
        ds = _within(30, lambda: ImageFolder(root, labels=False))
    assert sorted(Path(p).name for p in ds.paths) == ["0.png", "1.png", "2.png"]
    assert [(Path(p).name, "loop" in why) for p, why in ds.skipped] == [("self", True)]


def test_two_links_into_each_other_do_not_hang(tmp_path: Path) -> None:
    root = _three_images(tmp_path / "photos")
    (root / "a").mkdir()
    (root / "b").mkdir()
    (root / "a" / "to_b").symlink_to("../b")
    (root / "b" / "to_a").symlink_to("../a")
    (root / "self").symlink_to(".")
    with pytest.warns(SkippedFilesWarning):
        ds = _within(30, lambda: ImageFolder(root, labels=False))
    assert len(ds) == 3
    assert all("loop" in why for _, why in ds.skipped)


def test_a_link_to_a_folder_outside_is_still_followed(tmp_path: Path) -> None:
    elsewhere = _three_images(tmp_path / "elsewhere")
    root = _three_images(tmp_path / "photos")
    (root / "more").symlink_to(elsewhere)
    assert len(ImageFolder(root, labels=False)) == 6


@pytest.mark.parametrize("verify", [True, False])
def test_a_named_pipe_called_jpg_is_skipped_not_opened(tmp_path: Path, verify: bool) -> None:
    root = _three_images(tmp_path / "photos")
    os.mkfifo(root / "pipe.jpg")  # opening it for reading would wait for a writer forever
    with pytest.warns(SkippedFilesWarning, match=r"pipe.jpg \(not a regular file: a named pipe"):
        ds = _within(30, lambda: ImageFolder(root, labels=False, verify=verify))
    assert len(ds) == 3
    with pytest.raises(fs.FeaturescopeError, match="named pipe"):
        _within(30, lambda: load_rgb(root / "pipe.jpg"))


def test_a_dangling_link_is_skipped_with_its_reason(tmp_path: Path) -> None:
    root = _three_images(tmp_path / "photos")
    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.warns(SkippedFilesWarning, match=r"gone.png \(FileNotFoundError"):
        assert len(ImageFolder(root, labels=False)) == 3


def test_a_name_that_is_not_utf8_is_read_and_kept_byte_for_byte(tmp_path: Path) -> None:
    root = _three_images(tmp_path / "photos")
    raw = os.fsencode(root) + b"/caf\xe9.png"  # Latin-1: not valid UTF-8
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(buffer, "PNG")
    with open(raw, "wb") as fh:
        fh.write(buffer.getvalue())
    (open(os.fsencode(root) + b"/na\xefve.txt", "wb")).close()
    with pytest.warns(SkippedFilesWarning) as record:
        ds = ImageFolder(root, labels=False, transform=lambda image: image)
    [path] = [p for p in ds.paths if os.fsencode(p) == raw]  # the bytes come back unchanged
    assert ds[ds.paths.index(path)][0].getpixel((0, 0)) == (0, 200, 0)
    message = str(record[0].message)
    assert r"na\xefve.txt" in message  # the byte shown as an escape...
    message.encode("utf-8")  # ...and the message prints on any UTF-8 terminal
