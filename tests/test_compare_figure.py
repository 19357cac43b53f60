"""The ``similarity`` visualizer, ``write_comparison`` and ``featurescope compare``."""

from __future__ import annotations

import json
import math

import pytest
import torch

import featurescope as fs
from featurescope.cli import main
from featurescope.compare import Comparison, write_comparison


def comparison() -> Comparison:
    matrix = torch.tensor([[1.0, 0.25, math.nan], [0.5, 0.75, 0.125]], dtype=torch.float64)
    estimators = (("exact", "minibatch", "exact"), ("exact", "exact", "minibatch"))
    return Comparison(
        matrix,
        estimators,
        40,
        ("conv1", "fc"),
        ("c1", "c2", "logits"),
        "alexnet",
        "alexnet_half",
        "avgpool",
        8,
        5,
    )


def test_similarity_draws_names_values_and_estimators():
    fig = fs.visualize("similarity", comparison())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["conv1", "fc"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c1", "c2", "logits"]
    assert ax.get_ylabel() == "alexnet" and ax.get_xlabel() == "alexnet_half"
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["1.00", "0.25*", "n/a", "0.50", "0.75", "0.12*"]
    assert ax.get_title() == "linear CKA over 40 images"
    assert ax.images[0].get_clim() == (0.0, 1.0)  # one scale for every comparison
    assert len(fig.axes) == 2  # and the colour bar


def test_similarity_takes_a_plain_matrix_and_checks_the_names():
    fig = fs.visualize("similarity", [[0.1, 0.2]], nodes_b=["x", "y"], values=False)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0"]
    assert len(fig.axes[0].texts) == 0
    with pytest.raises(fs.errors.InputShapeError, match="2 columns but 3"):
        fs.visualize("similarity", [[0.1, 0.2]], nodes_b=["x", "y", "z"])
    with pytest.raises(fs.errors.InputShapeError, match=r"\[rows, columns\]"):
        fs.visualize("similarity", torch.zeros(2, 2, 2))


def test_write_comparison_files_read_back(tmp_path):
    result = comparison()
    paths = write_comparison(result, tmp_path)
    assert paths["figure"].read_bytes()[:4] == b"\x89PNG"
    saved = json.loads(paths["json"].read_text())
    assert saved["matrix"][0][2] is None  # NaN, as JSON can hold it
    back = Comparison.from_dict(saved)
    assert torch.equal(back.matrix.nan_to_num(-1), result.matrix.nan_to_num(-1))
    assert back.estimators == result.estimators
    page = paths["page"].read_text()
    assert 'title="alexnet fc × alexnet_half logits: 0.125 (minibatch)"' in page
    assert "data:image/png;base64," in page


def test_the_cli_writes_what_the_python_api_computes(tmp_path, search_data, capsys):
    torch.manual_seed(1)
    checkpoint = tmp_path / "half.safetensors"
    model = fs.create_model("alexnet_half").eval()
    fs.zoo.save_checkpoint(model, checkpoint, model_name="alexnet_half")
    out = tmp_path / "cmp"
    args = [
        "compare",
        "alexnet_half",
        "alexnet_half",
        "--data",
        str(search_data / "test"),
        "--checkpoint-a",
        str(checkpoint),
        "--checkpoint-b",
        str(checkpoint),
        "--nodes-a",
        "conv3,fc",
        "--nodes-b",
        "conv2",
        "--nodes-b",
        "conv3,fc",
        "--reduce",
        "avgpool",
        "--batch-size",
        "4",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    assert "images ->" in capsys.readouterr().out
    saved = json.loads((out / "matrix.json").read_text())
    images = fs.data.ImageFolder(
        search_data / "test", fs.zoo.resolve_preprocessing(model).transform()
    )
    expected = fs.compare(
        model,
        model,
        images,
        nodes_a=["conv3", "fc"],
        nodes_b=["conv2", "conv3", "fc"],
        reduce="avgpool",
        batch_size=4,
        progress=False,
    )
    torch.testing.assert_close(
        torch.tensor(saved["matrix"], dtype=torch.float64), expected.matrix, rtol=1e-9, atol=1e-12
    )
    assert saved["matrix"][0][1] == pytest.approx(1.0) and saved["num_images"] == len(images)
    assert {p.name for p in out.iterdir()} >= {"similarity.png", "matrix.csv", "index.html"}
    with pytest.raises(SystemExit) as usage:  # the last --batch-size counts: a usage error
        main([*args, "--batch-size", "3"])
    assert usage.value.code == 2
    assert "at least 4" in capsys.readouterr().err
