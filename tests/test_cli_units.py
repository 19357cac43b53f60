"""``featurescope units``: the files it writes, checked against the Python API's pieces, and its
one-line failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import featurescope as fs
from featurescope.cli import main
from featurescope.data import ImageFolder
from featurescope.tap import receptive_field
from featurescope.units import patch, project, top_activations

K = 2


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):  # sizes differ: the preprocessing makes them one
        pixels = rng.integers(0, 256, (30 + 7 * i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i}.png")
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a half AlexNet, so that the test can build the very model again."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "half.safetensors"
    return fs.zoo.save_checkpoint(fs.create_model("alexnet_half"), path, model_name="alexnet_half")


def _run(photos: Path, weights: Path, out: Path, *extra: str) -> int:
    argv = ["units", "--weights", str(weights), "--data", str(photos), "--nodes", "conv1"]
    return main([*argv, "-k", str(K), "--out", str(out), "--quiet", *extra])


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "random weights" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("featurescope units: error: ")
    return lines[0]


def test_units_writes_what_the_python_api_computes(
    photos: Path, weights: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "units"
    assert _run(photos, weights, out, "--file-channels", "3", "--figure-channels", "2") == 0
    printed = capsys.readouterr().out
    assert "3 images ->" in printed and "conv1.png" in printed
    units = json.loads((out / "units.json").read_text())
    assert (units["format"], units["k"], units["num_images"]) == ("featurescope.units", K, 3)
    assert units["input_size"] == [227, 227] and units["projection"] == "deconvnet"
    (node,) = units["nodes"]
    assert node["node"] == "conv1" and (out / node["figure"]).is_file()

    model = fs.zoo.load_checkpoint(weights).eval()
    preprocessing = fs.zoo.resolve_preprocessing(model)
    data = ImageFolder(photos, preprocessing.transform())
    top = top_activations(model, data, ["conv1"], K)["conv1"]
    field = receptive_field(model, "conv1", (227, 227))
    assert [c["channel"] for c in node["channels"]] == list(range(top.values.shape[0]))
    strongest = torch.argsort(-top.values[:, 0], stable=True)[:3].tolist()
    for channel in node["channels"]:
        c = channel["channel"]
        assert [t["rank"] for t in channel["top"]] == list(range(K))
        for t in channel["top"]:
            r = t["rank"]
            assert t["image_id"] == int(top.image_ids[c, r])
            assert t["position"] == top.positions[c, r].tolist()
            assert t["value"] == pytest.approx(float(top.values[c, r]), rel=1e-6)
            assert t["file"] == str(data.samples[t["image_id"]][0])
            assert tuple(t["box"]) == field.box(*t["position"])
            if c not in strongest:  # --file-channels 3: files for the 3 strongest only
                assert t["patch"] is None and t["projection"] is None
                continue
            image = data[t["image_id"]][0]
            seen = patch(
                image, field.box(*t["position"]), mean=preprocessing.mean, std=preprocessing.std
            )
            png = np.asarray(Image.open(out / t["patch"]), dtype=np.float64) / 255
            np.testing.assert_allclose(png, seen.permute(1, 2, 0).numpy(), atol=0.5 / 255 + 1e-6)
            projected = project(model, image, "conv1", c, tuple(t["position"]))
            top_, left, bottom, right = t["box"]
            crop = projected[:, top_:bottom, left:right]
            shown = crop / (2 * crop.abs().max()) + 0.5
            png = np.asarray(Image.open(out / t["projection"]), dtype=np.float64) / 255
            np.testing.assert_allclose(png, shown.permute(1, 2, 0).numpy(), atol=1.5 / 255)
    assert len(list((out / "conv1").iterdir())) == 3 * K * 2
    assert (out / "state").is_dir()


def test_resume_and_its_refusal_are_one_line(
    photos: Path, weights: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "units"
    assert _run(photos, weights, out, "--projection", "none") == 0
    first = json.loads((out / "units.json").read_text())
    assert first["projection"] is None
    assert all(t["projection"] is None for c in first["nodes"][0]["channels"] for t in c["top"])
    assert _run(photos, weights, out, "--projection", "none", "--resume") == 0
    assert json.loads((out / "units.json").read_text()) == first
    capsys.readouterr()
    assert _run(photos, weights, out, "-k", "3", "--resume") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "differs in accumulator" in line and "leave out --resume" in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "{photos}"], "name the nodes to show with --nodes"),
        (["--data", "{missing}", "--nodes", "conv1"], "does not exist"),
        (["--data", "{photos}", "--nodes", "conv9"], "conv9"),
    ],
)
def test_expected_failures_are_one_line(photos, tmp_path, capsys, argv, message) -> None:
    given = [a.format(photos=photos, missing=tmp_path / "nowhere") for a in argv]
    base = ["units", "--model", "alexnet_half", "--weights", "none", "--out", str(tmp_path / "o")]
    assert main([*base, *given, "--quiet"]) == 1
    assert message in _one_error_line(capsys.readouterr().err)


def test_the_units_page_shows_the_ranking_units_json_holds(photos, weights, tmp_path) -> None:
    from featurescope.pages import read_explorer_data

    out = tmp_path / "units"
    assert _run(photos, weights, out, "--projection", "guided") == 0
    saved = json.loads((out / "units.json").read_text())
    page = read_explorer_data(out / "units.html")["units"]
    (stage,) = page["stages"]
    assert stage["name"] == "conv1"
    channels = saved["nodes"][0]["channels"]
    assert len(stage["units"]) == len(channels) == stage["channels"]
    for unit, channel in zip(stage["units"], channels, strict=True):
        assert unit["channel"] == channel["channel"]
        names = [Path(page["sources"][e["source"]]["name"]).name for e in unit["top"]]
        assert names == [Path(t["file"]).name for t in channel["top"]]
        assert [e["box"] for e in unit["top"]] == [t["box"] for t in channel["top"]]
        # The page carries values to four decimals.
        assert [e["value"] for e in unit["top"]] == pytest.approx(
            [t["value"] for t in channel["top"]], abs=5e-5
        )
        # The page projects each channel's strongest example, with the projection asked for.
        assert unit["top"][0]["guided"] is not None and unit["top"][0]["deconvnet"] is None
