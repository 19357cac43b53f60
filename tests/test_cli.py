"""Every `featurescope` subcommand on tiny inputs, through the real entry point function."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from PIL import Image

import featurescope as fs
from featurescope.cli import build_parser, main
from featurescope.train import History
from featurescope.train.presets import PRESETS


@pytest.fixture
def registered_tiny(monkeypatch, tiny_preset):
    """``--preset tiny``: the shared tiny preset, on the half-width net only."""
    monkeypatch.setitem(PRESETS, "tiny", dataclasses.replace(tiny_preset, models=("alexnet_half",)))


@pytest.fixture(scope="module")
def data(tiny_data):
    return tiny_data


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) >= {
        "models",
        "summary",
        "nodes",
        "train",
        "maps",
        "index",
        "plugins",
        "convert",
        "demo",
    }
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: featurescope" in capsys.readouterr().out


def test_python_dash_m():
    done = subprocess.run(
        [sys.executable, "-m", "featurescope", "models", "alexnet*", "--details"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "alexnet_half" in done.stdout
    assert "conv1 [96, 27, 27]" in done.stdout


def test_models(capsys):
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert all(f"{name} " in listing for name in fs.list_models())
    assert main(["models", "*alexnet*", "--details"]) == 0
    out = capsys.readouterr().out
    for name in fs.list_models("*alexnet*"):
        params = sum(p.numel() for p in fs.create_model(name).parameters())
        assert f"{name} " in out and f"{params:,} params" in out
    assert main(["models", "no-such-model*"]) == 1
    half = fs.create_model("alexnet_half")
    with torch.no_grad():
        conv3 = half.conv3(half.conv2(half.conv1(torch.zeros(1, 3, 227, 227))))
    assert f"conv3 {list(conv3.shape[1:])}" in out


def test_train_then_resume(tmp_path, data, registered_tiny, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "alexnet_half",
        "--data",
        str(data),
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    assert (out / "last.safetensors").is_file()
    history = History.load(out / "history.json")
    assert history.epochs == 1
    assert main([*args, "--epochs", "2"]) == 0
    assert History.load(out / "history.json").epochs == 2
    assert History.load(out / "history.json").train_loss[0] == history.train_loss[0]
    assert "best.safetensors" in capsys.readouterr().out


def test_maps(tmp_path, data, capsys):
    image = next((data / "test").rglob("*.png"))
    assert (
        main(
            [
                "maps",
                str(image),
                "--layers",
                "conv1",
                "conv2.0",
                "--max-channels",
                "8",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    for name in ("conv1_grid.png", "conv1_sum.png", "conv2.0_grid.png", "conv2.0_sum.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_maps_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["maps", str(bad), "--out", str(tmp_path)]) == 1
    assert "cannot read image" in capsys.readouterr().err


def test_index_build_and_search(tmp_path, data, capsys):
    checkpoint = fs.save_checkpoint(fs.create_model("alexnet_half"), tmp_path / "m.safetensors")
    index_path = tmp_path / "train.fsindex"
    assert (
        main(
            [
                "index",
                "build",
                str(data),
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(index_path),
                "--quiet",
            ]
        )
        == 0
    )
    search = fs.ImageSearch.load(index_path)
    assert len(search.index) == 10
    assert search.index.dim == 2048
    query = sorted((data / "train" / "star").glob("*.png"))[0]
    montage = tmp_path / "montage.png"
    assert (
        main(["index", "search", str(index_path), str(query), "-k", "3", "--out", str(montage)])
        == 0
    )
    out = capsys.readouterr().out
    first_hit = out.splitlines()[2].split()
    assert float(first_hit[1]) == pytest.approx(0.0, abs=1e-3)  # the query itself is indexed
    assert first_hit[-1] == str(query.resolve())
    assert montage.stat().st_size > 0


def test_index_of_random_weights_searches_with_the_same_weights(tmp_path, data, capsys):
    index_path = tmp_path / "random.fsindex"
    args = ["index", "build", str(data / "train"), "--model", "alexnet_half"]
    assert main([*args, "--out", str(index_path), "--quiet"]) == 0
    query = sorted((data / "train" / "circle").glob("*.png"))[0]
    argv = ["index", "search", str(index_path), str(query), "-k", "1"]
    assert main([*argv, "--out", str(tmp_path / "m.png")]) == 0
    first_hit = capsys.readouterr().out.splitlines()[-2].split()
    assert float(first_hit[1]) == pytest.approx(0.0, abs=1e-3)
    assert first_hit[-1] == str(query.resolve())


def test_index_built_by_the_cli_is_searched_in_python_and_back(tmp_path, data, capsys):
    """``index build`` output loads with ImageSearch.load; ImageSearch.save output is searched
    by ``index search``; both give the same neighbours."""
    queries = [sorted((data / "test" / c).glob("*.png"))[0] for c in ("star", "circle")]
    built = tmp_path / "cli.fsindex"
    argv = ["index", "build", str(data), "--model", "alexnet_half", "--out", str(built)]
    assert main([*argv, "--quiet"]) == 0
    capsys.readouterr()
    from_cli = fs.ImageSearch.load(built)
    assert from_cli.search_images(queries, k=4).ids.shape == (2, 4)

    python = fs.ImageSearch.build(fs.create_model("alexnet_half"), data, progress=False)
    saved = python.save(tmp_path / "py.fsindex")
    argv = ["index", "search", str(saved), *map(str, queries), "-k", "4"]
    assert main([*argv, "--out", str(tmp_path / "m.png")]) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = python.search_images(queries, k=4)
    rows = [line.split() for line in printed if line.startswith("  ")]
    assert [row[-1] for row in rows] == [p for hits in expected.metadata for p in hits]
    assert [float(row[1]) for row in rows] == pytest.approx(
        expected.distances.flatten().tolist(), abs=1e-3
    )
    assert from_cli.index.metadata == python.index.metadata  # same folder, same paths


def test_index_search_of_something_else(tmp_path, capsys):
    index = fs.EmbeddingIndex(4)
    index.add(torch.zeros(1, 4))
    index.save(tmp_path / "i.safetensors")
    image = tmp_path / "q.png"
    Image.new("RGB", (40, 40)).save(image)
    assert main(["index", "search", str(tmp_path / "i.safetensors"), str(image)]) == 1
    assert "index build" in capsys.readouterr().err


def test_demo_command(tmp_path, data, registered_tiny):
    out = tmp_path / "demo"
    assert (
        main(["demo", "--data", str(data), "--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    )
    assert (out / "report.html").is_file()
    assert (out / "metrics.json").is_file()


def test_unknown_preset(capsys):
    assert main(["demo", "--preset", "quik", "--quiet"]) == 1
    assert "quick" in capsys.readouterr().err
