"""The explorer page's data, against a manual forward, sklearn's PCA and the index's own answer."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch

import featurescope as fs
from featurescope.cli import main
from featurescope.study import write_explorer
from featurescope.study.explorer import query_images


@pytest.fixture(scope="module")
def data(search_data):
    return search_data


@pytest.fixture(scope="module")
def search(image_search):
    return image_search


def _page_data(path):
    text = path.read_text(encoding="utf-8")
    match = re.search(r'<script id="fs-data" type="application/json">(.*?)</script>', text, re.S)
    return json.loads(match.group(1).replace("<\\/", "</"))


@pytest.fixture(scope="module")
def page(search, data, tmp_path_factory):
    test = fs.ImageFolder(data / "test")
    path = write_explorer(
        tmp_path_factory.mktemp("page") / "explorer.html",
        search,
        test.paths,
        query_labels=test.targets,
        k=4,
        projection="pca",
    )
    return _page_data(path), test


def test_neighbours_are_the_index_answer(page, search):
    content, test = page
    expected = search.search_images(test.paths, k=4)
    assert [[i for i, _ in q["neighbours"]] for q in content["queries"]] == expected.ids.tolist()
    distances = [[d for _, d in q["neighbours"]] for q in content["queries"]]
    np.testing.assert_allclose(distances, expected.distances.numpy(), atol=1e-4)
    shown = {g["id"] for g in content["gallery"]}
    assert {i for q in content["queries"] for i, _ in q["neighbours"]} <= shown
    scores = fs.retrieval_metrics(search.index, search.embed_images(test.paths), test.targets, k=4)
    assert content["metrics"]["this model"]["precision@k"] == pytest.approx(
        scores["precision_at_k"]
    )


def test_channels_are_sorted_by_mean_activation_of_a_manual_forward(page, search):
    content, test = page
    conv1 = next(s for s in content["stages"] if s["name"] == "conv1")
    assert [s["name"] for s in content["stages"]] == ["conv1", "conv2", "conv3"]  # not fc
    image = test[2][0][None]
    with torch.no_grad():
        expected = search.model.conv1(image)[0].double()
    means = expected.mean(dim=(1, 2))
    entry = conv1["maps"][2]
    assert entry["order"] == sorted(range(len(means)), key=lambda c: (-float(means[c]), c))
    raw = np.frombuffer(base64.b64decode(entry["data"]), dtype=np.uint8).reshape(expected.shape)
    c = entry["order"][0]
    channel = expected[c]
    scaled = ((channel - channel.min()) / (channel.max() - channel.min()) * 255).numpy()
    np.testing.assert_allclose(raw[c], scaled, atol=1.01)


def test_projection_is_the_gallery_pca(page, search):
    from sklearn.decomposition import PCA

    content, _ = page
    assert content["projection"]["method"] == "PCA"
    points = np.array([p[1:] for p in content["projection"]["points"]])
    reference = PCA(n_components=2).fit_transform(search.index.vectors.double().numpy())
    for axis in range(2):  # a principal axis is defined up to its sign
        sign = np.sign(points[:, axis] @ reference[:, axis])
        np.testing.assert_allclose(points[:, axis] * sign, reference[:, axis], atol=1e-3)


def test_grad_cam_and_prediction_for_every_query(page, search):
    content, test = page
    batch = search.preprocess(test.paths)
    with torch.no_grad():
        predicted = search.model.eval()(batch).argmax(1).tolist()
    assert [q["predicted"] for q in content["queries"]] == predicted
    assert all(q["gradcam"].startswith("data:image/png;base64,") for q in content["queries"])


def test_bad_arguments_are_clear_errors(search, tmp_path):
    with pytest.raises(fs.FeaturescopeError, match="projection"):
        write_explorer(tmp_path / "x.html", search, ["a.png"], projection="tsne")
    with pytest.raises(fs.FeaturescopeError, match="at least one"):
        write_explorer(tmp_path / "x.html", search, [])
    assert not (tmp_path / "x.html").exists()


def test_query_images_are_labelled_by_their_folder(data):
    paths, labels = query_images(data / "test", ["circle", "star"])
    names = [p.split("/")[-2] for p in paths]
    assert labels == [{"circle": 0, "star": 1}.get(n, -1) for n in names]
    assert len(query_images(data / "train", limit=3)[0]) == 3


def test_explore_command_on_an_index_built_by_the_cli(tmp_path, data, capsys):
    index = tmp_path / "shapes.fsindex"
    argv = ["index", "build", str(data), "--model", "alexnet_half", "--out", str(index)]
    assert main([*argv, "--quiet"]) == 0
    out = tmp_path / "page.html"
    argv = ["explore", "--index", str(index), "--images", str(data / "test"), "-k", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "explorer ->" in capsys.readouterr().out
    content = _page_data(out)
    search = fs.ImageSearch.load(index)
    paths = [q["path"] for q in content["queries"]]
    expected = search.search_images(paths, k=3).ids.tolist()
    assert [[i for i, _ in q["neighbours"]] for q in content["queries"]] == expected
    assert all(q["label"] >= 0 for q in content["queries"])
    assert main(["explore", "--index", str(index), "--out", str(tmp_path / "self.html")]) == 0
    assert main(["explore", "--index", str(tmp_path)]) == 1
    assert "search.json" in capsys.readouterr().err
