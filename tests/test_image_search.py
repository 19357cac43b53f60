"""ImageSearch: build, search, save and load, against a manual embedding and a float64 brute force."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import featurescope as fs
from featurescope.zoo import decorated


@pytest.fixture(scope="module")
def data(search_data):
    return search_data


@pytest.fixture(scope="module")
def search(image_search):
    return image_search


def _manual_embedding(model, images):
    with torch.no_grad():
        return model.fc[:5](torch.flatten(model.conv3(model.conv2(model.conv1(images))), 1))


def test_search_matches_a_manual_embedding_and_brute_force(search, data):
    from PIL import Image

    train = fs.data.ImageFolder(data / "train")
    gallery = torch.stack([train[i][0] for i in range(len(train))])
    manual = _manual_embedding(search.model, gallery)
    torch.testing.assert_close(search.index.vectors, manual)
    assert search.index.metadata == [str(Path(p).resolve()) for p in train.paths]

    query = sorted((data / "test" / "star").glob("*.png"))[0]
    picture = search.preprocessing.transform()(Image.open(query).convert("RGB"))
    distances = torch.cdist(
        _manual_embedding(search.model, picture[None]).double(), manual.double()
    )[0]
    expected = sorted(range(len(distances)), key=lambda j: (distances[j].item(), j))[:5]
    result = search.search_images([query], k=5)
    assert result.ids[0].tolist() == expected
    torch.testing.assert_close(result.distances[0], distances[expected], atol=1e-4, rtol=1e-4)
    assert result.metadata[0] == [search.index.metadata[j] for j in expected]


def test_paths_pil_and_tensors_search_alike(search, data):
    from PIL import Image

    paths = sorted((data / "test").rglob("*.png"))[:3]
    by_path = search.search_images(paths, k=4)
    by_pil = search.search_images([Image.open(p).convert("RGB") for p in paths], k=4)
    tensors = torch.stack(
        [search.preprocessing.transform()(Image.open(p).convert("RGB")) for p in paths]
    )
    by_tensor = search.search_images(tensors, k=4)
    for other in (by_pil, by_tensor):
        assert other.ids.tolist() == by_path.ids.tolist()
        torch.testing.assert_close(other.distances, by_path.distances)
    assert search.search_images(paths[0], k=1).ids.shape == (1, 1)


def test_save_load_round_trip_is_one_safe_folder(search, data, tmp_path):
    folder = search.save(tmp_path / "shapes.fsindex")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["index.safetensors", "model.safetensors", "search.json"]
    manifest = json.loads((folder / "search.json").read_text())
    assert manifest["model"] == "alexnet_half"
    assert manifest["node"] == "fc.4"
    assert manifest["checkpoint"] == "model.safetensors"  # random weights: kept
    assert manifest["class_names"] == search.class_names
    assert all(not p.startswith("/") for p in manifest["paths"])  # relative to the root
    assert fs.EmbeddingIndex.load(folder / "index.safetensors").metadata == manifest["paths"]

    again = fs.ImageSearch.load(folder)
    queries = sorted((data / "test").rglob("*.png"))
    first, second = search.search_images(queries, k=6), again.search_images(queries, k=6)
    assert second.ids.tolist() == first.ids.tolist()
    torch.testing.assert_close(second.distances, first.distances)
    assert second.metadata == first.metadata
    assert again.preprocessing == search.preprocessing
    assert not list(tmp_path.glob(".shapes.fsindex*"))  # no staging folder left behind


def test_moved_images_are_found_with_images_option(search, data, tmp_path):
    folder = search.save(tmp_path / "moved.fsindex")
    moved = shutil.copytree(data / "train", tmp_path / "elsewhere")
    again = fs.ImageSearch.load(folder, images=moved)
    assert all(str(p).startswith(str(moved)) for p in again.index.metadata)
    assert all(os.path.isfile(p) for p in again.index.metadata)


def test_weights_the_zoo_rebuilds_are_not_copied(tmp_path, data):
    @fs.zoo.register_model("fixed_probe_test", embedding_node="1")
    def fixed(num_classes=5):
        net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, num_classes))
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(0.01)
        return net

    try:
        search = fs.ImageSearch.build(fs.create_model("fixed_probe_test"), data, progress=False)
        folder = search.save(tmp_path / "fixed.fsindex")
        assert not (folder / "model.safetensors").exists()
        assert json.loads((folder / "search.json").read_text())["checkpoint"] is None
        again = fs.ImageSearch.load(folder)
        torch.testing.assert_close(again.index.vectors, search.index.vectors)
    finally:
        decorated.remove("fixed_probe_test")


def test_resave_replaces_but_a_foreign_folder_is_refused(search, tmp_path):
    folder = search.save(tmp_path / "s.fsindex")
    search.save(folder)  # replacing an earlier search is fine
    assert fs.ImageSearch.load(folder).index.ids.tolist() == search.index.ids.tolist()
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(fs.FeaturescopeError, match="did not write"):
        search.save(precious)
    assert [p.name for p in precious.iterdir()] == ["keep.txt"]


def test_load_refuses_what_is_not_a_search(tmp_path):
    with pytest.raises(fs.errors.IndexFileError, match="search.json"):
        fs.ImageSearch.load(tmp_path)
    (tmp_path / "search.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(fs.errors.IndexFileError, match="format"):
        fs.ImageSearch.load(tmp_path)
    (tmp_path / "search.json").write_text(
        json.dumps({"format": "featurescope-image-search/1", "index": "../x", "checkpoint": None})
    )
    with pytest.raises(fs.errors.IndexFileError, match="index"):
        fs.ImageSearch.load(tmp_path)


def test_a_model_outside_the_zoo_searches_but_cannot_be_saved(tmp_path, data):
    net = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())
    with pytest.raises(fs.FeaturescopeError, match="node="):
        fs.ImageSearch(net, fs.EmbeddingIndex(12))
    search = fs.ImageSearch.build(net, data, node="1", progress=False)
    assert search.index.dim == 12
    assert search.search_images(sorted((data / "test").rglob("*.png"))[:1], k=2).ids.shape == (1, 2)
    with pytest.raises(fs.FeaturescopeError, match="zoo model"):
        search.save(tmp_path / "x.fsindex")
    assert not (tmp_path / "x.fsindex").exists()


def test_bad_query_is_a_clear_error(search, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(fs.FeaturescopeError, match="cannot read image"):
        search.search_images([bad], k=1)
    with pytest.raises(fs.errors.InputShapeError, match=r"\[3, H, W\]"):
        search.search_images(torch.zeros(2, 2), k=1)


def test_montage_draws_each_query_and_its_neighbours(search, data):
    queries = sorted((data / "test").rglob("*.png"))[:2]
    figure = search.montage(queries, k=3)
    assert len(figure.axes) == 2 * (3 + 1)


@pytest.mark.slow
def test_a_flat_folder_of_unlabelled_photos_is_searched(tmp_path, capsys):
    """The usual case for search by image: photos with no classes, and a stray file or two."""
    from PIL import Image
    from skimage import data as images

    from featurescope.cli import main

    photos = tmp_path / "photos"
    (photos / "trip").mkdir(parents=True)
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        where = photos / "trip" if i % 2 else photos
        Image.fromarray(getattr(images, name)()).save(where / f"{name}.jpg")
    (photos / "notes.txt").write_text("not an image")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    model = fs.create_model("resnet18").eval()
    with pytest.warns(fs.data.SkippedFilesWarning, match="skipped 2"):
        search = fs.ImageSearch.build(model, photos, progress=False)
    assert len(search.index) == 4 and not search.class_names
    assert sorted(Path(p).name for p, _ in search.skipped) == ["broken.jpg", "notes.txt"]
    distances, ids = search.search_images([photos / "trip" / "coffee.jpg"], k=4)
    row = search.index.ids.tolist().index(int(ids[0, 0]))
    assert float(distances[0, 0]) == 0.0 and Path(search.index.metadata[row]).name == "coffee.jpg"
    again = fs.ImageSearch.load(search.save(tmp_path / "photos.fsindex"))
    assert sorted(Path(p).name for p, _ in again.skipped) == ["broken.jpg", "notes.txt"]
    torch.testing.assert_close(
        again.search_images([photos / "trip" / "coffee.jpg"], k=4).distances, distances
    )
    # The CLI builds the same (its random weights, as above), says what it skipped in one line,
    # and searches what Python built.
    argv = ["index", "build", str(photos), "--model", "resnet18", "--weights", "none"]
    assert main([*argv, "--out", str(tmp_path / "cli.fsindex"), "--quiet"]) == 0
    assert "featurescope: skipped 2 of 6 files" in capsys.readouterr().err
    assert (
        main(
            [
                "index",
                "search",
                str(tmp_path / "photos.fsindex"),
                str(photos / "trip" / "coffee.jpg"),
                "-k",
                "2",
                "--out",
                str(tmp_path / "m.png"),
            ]
        )
        == 0
    )


@pytest.mark.slow
def test_a_moved_folder_is_re_pointed_with_root(search, data, tmp_path, capsys):
    """Build on a real copy of a folder, move the copy, search it again from where it went."""
    from featurescope.cli import main

    original = Path(shutil.copytree(data, tmp_path / "shapes")).resolve()
    built = fs.ImageSearch.build(search.model, original, progress=False)
    folder = built.save(tmp_path / "shapes.fsindex")
    manifest = json.loads((folder / "search.json").read_text())
    assert all(not Path(p).is_absolute() for p in manifest["paths"])
    assert manifest["weights"] == "random"
    queries = sorted((original / "test").rglob("*.png"))[:3]
    before = built.search_images(queries, k=4)
    moved = tmp_path.resolve() / "elsewhere" / "shapes"
    moved.parent.mkdir()
    os.rename(original, moved)

    stale = fs.ImageSearch.load(folder)
    assert len(stale.missing_images()) == len(stale.index)
    assert main(["explore", "--index", str(folder), "--out", str(tmp_path / "x.html")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing" in err and "--root" in err  # one line, what to do
    again = fs.ImageSearch.load(folder, root=moved / "train")
    assert again.missing_images() == [] and again.missing_summary() is None
    assert again.weights == "random" and fs.model_metadata(again.model).weights == "random"
    moved_queries = [moved / q.relative_to(original) for q in queries]
    after = again.search_images(moved_queries, k=4)
    assert after.ids.tolist() == before.ids.tolist()
    torch.testing.assert_close(after.distances, before.distances)
    expected = [
        [str(moved / Path(p).relative_to(original)) for p in row] for row in before.metadata
    ]
    assert after.metadata == expected

    # The command line re-points it the same way, and says nothing is missing.
    argv = ["index", "search", str(folder), str(moved_queries[0]), "-k", "2"]
    assert main([*argv, "--root", str(moved / "train"), "--out", str(tmp_path / "m.png")]) == 0
    out, err = capsys.readouterr()
    assert "missing" not in err and str(moved) in out
    with pytest.raises(fs.FeaturescopeError, match="not a folder"):
        fs.ImageSearch.load(folder, root=tmp_path / "nowhere")


@pytest.mark.slow
def test_missing_images_are_named_and_the_rest_still_works(search, data, tmp_path, capsys):
    from featurescope.cli import main

    copy = shutil.copytree(data, tmp_path / "shapes")
    built = fs.ImageSearch.build(search.model, copy, progress=False)
    folder = built.save(tmp_path / "s.fsindex")
    gone = sorted((copy / "train" / "star").glob("*.png"))[:2]
    for path in gone:
        path.unlink()
    again = fs.ImageSearch.load(folder)
    assert sorted(again.missing_images()) == sorted(str(p.resolve()) for p in gone)
    summary = again.missing_summary()
    assert summary.startswith(f"2 of {len(again.index)} indexed images are missing: ")
    assert all(f"star/{p.name}" in summary for p in gone)
    # The star query's nearest images include the missing ones: drawn as placeholders.
    query = sorted((copy / "test" / "star").glob("*.png"))[0]
    figure = again.montage([query], k=len(again.index))
    titles = [ax.get_title() for ax in figure.axes]
    assert sum("missing: " in t for t in titles) == 2
    montage = tmp_path / "m.png"
    argv = ["index", "search", str(folder), str(query), "-k", "100", "--out", str(montage)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: {summary}",
        f"note: -k 100 is more than the {len(again.index)} indexed images; showing "
        f"{len(again.index)}",
    ]
    assert "Random weights" in err
    assert len([line for line in out.splitlines() if line.startswith("  ")]) == len(again.index)
    assert montage.stat().st_size > 0

    page = tmp_path / "p.html"
    assert main(["explore", "--index", str(folder), "--out", str(page), "-k", "3"]) == 0
    from featurescope.study.explorer import read_explorer_data

    content = read_explorer_data(page)
    assert content["notes"]["missing"] == summary
    assert "missing" in capsys.readouterr().err
    assert all(os.path.isfile(q["path"]) for q in content["queries"])  # missing: not queried
    blank = [g for g in content["gallery"] if g["image"] is None]
    assert {g["name"] for g in blank} == {f"star/{p.name}" for p in gone}
