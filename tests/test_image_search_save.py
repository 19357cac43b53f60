"""ImageSearch.save never deletes what featurescope did not write, and replaces atomically."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

import featurescope as fs
from featurescope.cli import main


@pytest.fixture(scope="module")
def search(image_search):
    return image_search


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_photo_folder_with_a_search_json_is_never_replaced(search, tmp_path):
    holiday = tmp_path / "holiday"
    holiday.mkdir()
    (holiday / "IMG_0001.jpg").write_bytes(b"\xff\xd8 a photo")
    (holiday / "search.json").write_text("{}")
    before = _listing(holiday)
    with pytest.raises(fs.FeaturescopeError, match=r"did not write.*overwrite=True"):
        search.save(holiday)
    with pytest.raises(fs.FeaturescopeError, match="did not write"):
        search.save(holiday, overwrite=True)
    assert _listing(holiday) == before


def test_the_cli_refuses_it_in_one_line(search_data, tmp_path, capsys):
    holiday = tmp_path / "holiday"
    holiday.mkdir()
    (holiday / "IMG_0001.jpg").write_bytes(b"a photo")
    (holiday / "search.json").write_text(json.dumps({"format": "featurescope-image-search/1"}))
    before = _listing(holiday)
    argv = ["index", "build", str(search_data / "train"), "--weights", "none", "--quiet"]
    assert main([*argv, "--out", str(holiday)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "IMG_0001.jpg" in err[-1] and "Traceback" not in "\n".join(err)
    assert _listing(holiday) == before


def test_a_saved_search_the_user_added_to_is_not_replaced(search, tmp_path):
    folder = search.save(tmp_path / "s.fsindex")
    (folder / "notes.txt").write_text("mine")
    (folder / "extra").mkdir()
    before = _listing(folder / "extra") | {"notes.txt": b"mine"}
    with pytest.raises(fs.FeaturescopeError, match=r"extra/.*notes\.txt"):
        search.save(folder)
    assert (folder / "notes.txt").read_text() == "mine"
    assert _listing(folder / "extra") | {"notes.txt": b"mine"} == before
    assert fs.ImageSearch.load(folder).index.ids.tolist() == search.index.ids.tolist()


def test_overwrite_false_refuses_even_our_own_folder(search, tmp_path):
    folder = search.save(tmp_path / "s.fsindex")
    manifest = (folder / "search.json").read_bytes()
    with pytest.raises(fs.FeaturescopeError, match="overwrite=True"):
        search.save(folder, overwrite=False)
    assert (folder / "search.json").read_bytes() == manifest
    search.save(folder)  # the default replaces a folder that is wholly ours
    assert fs.ImageSearch.load(folder).index.ids.tolist() == search.index.ids.tolist()


def test_files_and_links_are_refused(search, tmp_path):
    file = tmp_path / "plain.fsindex"
    file.write_text("a file")
    real = search.save(tmp_path / "real.fsindex")
    link = tmp_path / "link.fsindex"
    link.symlink_to(real, target_is_directory=True)
    for target in (file, link):
        with pytest.raises(fs.FeaturescopeError, match="not a folder featurescope wrote"):
            search.save(target)
    assert file.read_text() == "a file" and link.is_symlink()


def test_a_killed_saves_leftovers_are_removed_and_nothing_else(search, tmp_path):
    target = tmp_path / "s.fsindex"
    leftover = tmp_path / ".s.fsindex.k1ll3d_x"
    leftover.mkdir()
    (leftover / "index.safetensors").write_bytes(b"half")
    (leftover / ".model.safetensors.abc.tmp").write_bytes(b"half")
    user_dirs = [tmp_path / ".s.fsindex.backup", tmp_path / ".s.fsindex.abcdefgh"]
    user_dirs[0].mkdir()
    user_dirs[1].mkdir()
    (user_dirs[1] / "photo.jpg").write_bytes(b"mine")  # the right name, but not our files
    search.save(target)
    assert not leftover.exists()
    assert all(d.is_dir() for d in user_dirs) and (user_dirs[1] / "photo.jpg").exists()
    hidden = {p.name for p in tmp_path.iterdir() if p.name.startswith(".s.fsindex")}
    assert hidden == {".s.fsindex.backup", ".s.fsindex.abcdefgh"}


def test_replacing_exchanges_the_folder_in_one_step(search, tmp_path, monkeypatch):
    """The old folder and the new one swap places in one rename: the path is never missing."""
    from featurescope.study import _owned_folder

    target = search.save(tmp_path / "s.fsindex")
    old_inode = target.stat().st_ino
    swaps: list[tuple[bool, set[str]]] = []
    real_exchange = _owned_folder._exchange

    def watching(a, b):
        done = real_exchange(a, b)
        swaps.append((done, set(os.listdir(b))))
        return done

    monkeypatch.setattr(_owned_folder, "_exchange", watching)
    search.save(target)
    assert swaps == [(True, {"search.json", "index.safetensors"} | set(os.listdir(target)))]
    assert target.stat().st_ino != old_inode
    assert fs.ImageSearch.load(target).index.ids.tolist() == search.index.ids.tolist()


def test_concurrent_saves_to_one_path_are_serialised(search, tmp_path):
    target = tmp_path / "s.fsindex"
    errors: list[BaseException] = []

    def save() -> None:
        try:
            search.save(target)
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=save) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert fs.ImageSearch.load(target).index.ids.tolist() == search.index.ids.tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.fsindex"]  # no lock file left


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_the_metric_is_built_saved_and_searched(search_data, tmp_path, metric):
    import torch

    model = fs.create_model("alexnet_half", num_classes=3).eval()
    built = fs.ImageSearch.build(model, search_data / "train", progress=False, metric=metric)
    again = fs.ImageSearch.load(built.save(tmp_path / "m.fsindex"))
    assert built.index.metric == again.index.metric == metric
    queries = sorted((search_data / "test").rglob("*.png"))[:2]
    result = again.search_images(queries, k=3)
    gallery = again.index.vectors.double()
    q = again.embed_images(queries).double()
    if metric == "cosine":
        gallery = gallery / gallery.norm(dim=1, keepdim=True)
        q = q / q.norm(dim=1, keepdim=True)
    scores = q @ gallery.T
    ids = again.index.ids
    for row, found in zip(scores, result.ids.tolist(), strict=True):
        order = sorted(range(len(row)), key=lambda j: (-row[j].item(), ids[j].item()))[:3]
        assert found == [ids[j].item() for j in order]
    torch.testing.assert_close(
        result.distances.double(), scores.sort(dim=1, descending=True).values[:, :3]
    )


def test_the_cli_builds_with_a_metric(search_data, tmp_path, capsys):
    out = tmp_path / "c.fsindex"
    argv = ["index", "build", str(search_data / "train"), "--model", "alexnet_half"]
    assert (
        main([*argv, "--weights", "none", "--metric", "cosine", "--out", str(out), "--quiet"]) == 0
    )
    assert fs.ImageSearch.load(out).index.metric == "cosine"
    with pytest.raises(SystemExit):
        main([*argv, "--metric", "manhattan", "--out", str(out)])
    assert "invalid choice: 'manhattan'" in capsys.readouterr().err
