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


@pytest.mark.slow
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
        # Built as its pretrained weights have it: tv_alexnet with its 1000 classes.
        classes = fs.zoo.model_spec(name).pretrained_classes
        params = sum(p.numel() for p in fs.create_model(name, num_classes=classes).parameters())
        assert f"{name} " in out and f"{params:,} params" in out
    assert main(["models", "no-such-model*"]) == 1
    half = fs.create_model("alexnet_half")
    with torch.no_grad():
        conv3 = half.conv3(half.conv2(half.conv1(torch.zeros(1, 3, 227, 227))))
    assert f"conv3 {list(conv3.shape[1:])}" in out


@pytest.mark.slow
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
                "conv1,conv2.0",
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
    checkpoint = fs.zoo.save_checkpoint(fs.create_model("alexnet_half"), tmp_path / "m.safetensors")
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


@pytest.mark.slow
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


# `featurescope demo` itself: tests/test_demo.py runs it once through main() for all its tests.


def test_unknown_preset(capsys):
    assert main(["demo", "--preset", "quik", "--quiet"]) == 1
    assert "quick" in capsys.readouterr().err


# --- --weights: pretrained by default, random on purpose, a file; never the network ----------


@pytest.fixture
def no_network(monkeypatch):
    """Offline, and any attempt to connect anywhere fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("FEATURESCOPE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def torch_home(tmp_path, monkeypatch, no_network):
    """An empty torch hub cache of the test's own."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    (home / "hub" / "checkpoints").mkdir(parents=True)
    return home


@pytest.fixture
def built(monkeypatch):
    """The models the commands build, in order."""
    from featurescope.cli import _build, _study

    models = []

    def build_model(args):
        models.append(_build.build_model(args))
        return models[-1]

    monkeypatch.setattr(_study, "build_model", build_model)
    return models


@pytest.fixture
def cached_squeezenet(torch_home):
    """squeezenet1_1's default weights file in the hub cache, under torchvision's own name:
    random weights (seeded), as a machine that fetched the real ones would hold them."""
    import os

    import torchvision

    weights = torchvision.models.SqueezeNet1_1_Weights.DEFAULT
    torch.manual_seed(7)
    state = torchvision.models.squeezenet1_1(weights=None).state_dict()
    torch.save(state, torch_home / "hub" / "checkpoints" / os.path.basename(weights.url))
    return state


def _image(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (120, 30, 200)).save(path)
    return path


def test_index_build_uses_cached_pretrained_weights_without_being_told(
    tmp_path, data, cached_squeezenet, built, capsys
):
    out = tmp_path / "photos.fsindex"
    argv = ["index", "build", str(data / "train"), "--model", "squeezenet1_1"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    assert "random weights" not in capsys.readouterr().err
    meta = fs.model_metadata(built[0])
    assert (meta.weights, meta.num_classes) == ("torchvision:IMAGENET1K_V1", 1000)
    for weights in (built[0].state_dict(), fs.ImageSearch.load(out).model.state_dict()):
        assert weights.keys() == cached_squeezenet.keys()
        for name, tensor in cached_squeezenet.items():
            assert torch.equal(weights[name].cpu(), tensor), name


_SQUEEZE_MAPS = ["--model", "squeezenet1_1", "--layers", "features.0", "--max-channels", "2"]


def test_a_weights_tag_is_those_weights(tmp_path, cached_squeezenet, built, capsys):
    argv = ["maps", str(_image(tmp_path)), *_SQUEEZE_MAPS, "--out", str(tmp_path / "maps")]
    assert main([*argv, "--weights", "IMAGENET1K_V1"]) == 0
    assert "random weights" not in capsys.readouterr().err
    assert fs.model_metadata(built[0]).weights == "torchvision:IMAGENET1K_V1"
    assert torch.equal(built[0].features[0].weight, cached_squeezenet["features.0.weight"])
    assert main([*argv, "--weights", "IMAGENET1K_V9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("featurescope maps: error: unknown weights 'IMAGENET1K_V9'")
    assert "IMAGENET1K_V1" in err and len(err.splitlines()) == 1


def test_random_weights_are_said_once_and_recorded(tmp_path, torch_home, built, capsys):
    argv = ["maps", str(_image(tmp_path)), *_SQUEEZE_MAPS, "--out", str(tmp_path / "maps")]
    assert main([*argv, "--weights", "none"]) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "random" in line]
    assert notices == [
        "featurescope: squeezenet1_1 has random weights (--weights none): its feature maps and "
        "neighbours mean little; leave --weights out for its pretrained IMAGENET1K_V1 weights"
    ]
    assert fs.model_metadata(built[0]).weights == "random"


def test_a_model_without_pretrained_weights_is_random_by_default_and_says_so(
    tmp_path, built, capsys
):
    argv = ["maps", str(_image(tmp_path)), "--model", "alexnet_half", "--out", str(tmp_path)]
    assert main([*argv, "--layers", "conv1", "--max-channels", "2"]) == 0
    assert fs.model_metadata(built[0]).weights == "random"
    notices = [line for line in capsys.readouterr().err.splitlines() if "random" in line]
    assert len(notices) == 1
    assert notices[0].startswith(
        "featurescope: alexnet_half has random weights (the zoo has no pretrained weights for it)"
    )
    assert main([*argv, "--weights", "IMAGENET1K_V1"]) == 1
    assert "alexnet_half has no pretrained weights" in capsys.readouterr().err


def test_weights_not_on_this_machine_are_one_line(tmp_path, torch_home, capsys):
    argv = ["maps", str(_image(tmp_path)), *_SQUEEZE_MAPS, "--out", str(tmp_path / "maps")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("featurescope maps: error: ")
    assert "squeezenet1_1-b8a52dc0.pth" in err and "--weights none" in err


def test_weights_file_and_checkpoint_alias(tmp_path, capsys):
    torch.manual_seed(3)
    path = fs.zoo.save_checkpoint(fs.create_model("alexnet_half"), tmp_path / "m.safetensors")
    image = str(_image(tmp_path))
    for flag in ("--weights", "--checkpoint"):
        out = tmp_path / flag.strip("-")
        argv = ["maps", image, flag, str(path), "--layers", "conv1", "--max-channels", "2"]
        assert main([*argv, "--out", str(out)]) == 0
    assert "random" not in capsys.readouterr().err
    assert (tmp_path / "weights" / "conv1_grid.png").read_bytes() == (
        tmp_path / "checkpoint" / "conv1_grid.png"
    ).read_bytes()
    with pytest.raises(SystemExit) as info:
        main(["maps", image, "--weights", "none", "--checkpoint", str(path)])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--weights", "--checkpoint"])
def test_a_text_file_as_weights_is_not_a_checkpoint(tmp_path, flag, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("to do: train the model\n")
    argv = ["maps", str(_image(tmp_path)), flag, str(notes), "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"featurescope maps: error: {notes} is not a checkpoint: it looks like")
    assert "pickle" not in err and len(err.splitlines()) == 1
