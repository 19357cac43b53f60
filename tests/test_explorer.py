"""The explorer page's data, against a manual forward, sklearn's PCA, a float64 brute force,
Grad-CAM itself and the index's own answer; and the page of a user's own folder."""

from __future__ import annotations

import base64
import io
import json
import shutil
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import featurescope as fs
from featurescope.cli import main
from featurescope.study import write_explorer
from featurescope.study.explorer import query_images, read_explorer_data


@pytest.fixture(scope="module")
def data(search_data):
    return search_data


@pytest.fixture(scope="module")
def search(image_search):
    return image_search


def _page_data(path):
    return read_explorer_data(path)


def _unpack(b64):
    return np.frombuffer(zlib.decompress(base64.b64decode(b64)), dtype=np.uint8)


def _scaled(values):
    """A textbook min-max scaling to 0..255 of one map, as float64."""
    values = values.double()
    return ((values - values.min()) / (values.max() - values.min()) * 255).numpy()


def _as_trained(model, names):
    """``model`` with metadata saying its head was trained on ``names`` (a checkpoint's)."""
    meta = fs.model_metadata(model)
    return fs.zoo.attach_metadata(model, meta.replace(weights="checkpoint:0123", class_names=names))


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
    assert content["stages"][0]["label"] == "stage 1 (27×27)"
    image = test[2][0][None]
    with torch.no_grad():
        expected = search.model.conv1(image)[0].double()
    means = expected.mean(dim=(1, 2))
    entry = conv1["maps"][2]
    assert entry["order"] == sorted(range(len(means)), key=lambda c: (-float(means[c]), c))
    np.testing.assert_allclose(entry["means"], means[entry["order"]].numpy(), rtol=1e-4)
    # The maps travel in that order, each channel scaled to 0..255 on its own (27 px: unpooled).
    raw = _unpack(entry["data"]).reshape(len(entry["order"]), *expected.shape[1:])
    for position in (0, len(entry["order"]) - 1):
        channel = expected[entry["order"][position]]
        np.testing.assert_allclose(raw[position], _scaled(channel), atol=1.01)


def test_large_maps_are_pooled_and_only_the_strongest_channels_travel(search, data, tmp_path):
    test = fs.ImageFolder(data / "test")
    path = write_explorer(
        tmp_path / "p.html", search, test.paths[:2], k=2, stages=["conv1.0"], max_channels=5
    )
    (stage,) = _page_data(path)["stages"]
    image = test[1][0][None]
    with torch.no_grad():
        maps = search.model.conv1[0](image)[0].double()  # [48, 55, 55]: pooled by 2 to 28
    assert stage["shape"] == list(maps.shape) and stage["shipped"] == [5, 28, 28]
    entry = stage["maps"][1]
    means = maps.mean(dim=(1, 2))
    assert entry["order"] == sorted(range(48), key=lambda c: (-float(means[c]), c))[:5]
    pooled = F.avg_pool2d(maps[None], 2, ceil_mode=True)[0]
    raw = _unpack(entry["data"]).reshape(5, 28, 28)
    for position, channel in enumerate(entry["order"]):
        np.testing.assert_allclose(raw[position], _scaled(pooled[channel]), atol=1.01)
    np.testing.assert_allclose(
        _unpack(entry["sum"]).reshape(28, 28), _scaled(pooled.sum(0)), atol=1.01
    )


def test_projection_is_the_gallery_pca(page, search):
    from sklearn.decomposition import PCA

    content, _ = page
    assert content["projection"]["method"] == "PCA"
    points = np.array([p[1:] for p in content["projection"]["points"]])
    reference = PCA(n_components=2).fit_transform(search.index.vectors.double().numpy())
    for axis in range(2):  # a principal axis is defined up to its sign
        sign = np.sign(points[:, axis] @ reference[:, axis])
        np.testing.assert_allclose(points[:, axis] * sign, reference[:, axis], atol=1e-3)


def test_a_random_head_predicts_nothing_and_says_why(page):
    content, _ = page
    assert content["weights"] == "random"
    assert all(q["predicted"] is None and q["cam"] is None for q in content["queries"])
    assert "untrained (random weights)" in content["no_cam_reason"]
    assert content["weights_sentence"].startswith("Random weights")


def test_grad_cam_and_prediction_of_a_trained_head(search, data, tmp_path):
    classes = ["circle", "square", "star", "triangle", "cross"]
    model = _as_trained(fs.create_model("alexnet_half"), classes)
    trained = fs.ImageSearch(model, search.index, root=search.root, class_names=classes)
    test = fs.ImageFolder(data / "test")
    path = write_explorer(tmp_path / "t.html", trained, test.paths, k=3, batch_size=2)
    content = _page_data(path)
    batch = trained.preprocess(test.paths)
    with torch.no_grad():
        predicted = model.eval()(batch).argmax(1).tolist()
    assert [q["predicted"] for q in content["queries"]] == predicted
    assert [q["predicted_name"] for q in content["queries"]] == [classes[p] for p in predicted]
    cam = fs.grad_cam(model, batch, target=predicted)  # all at once: the page went by twos
    assert content["cam_node"] == cam.node
    side = content["cam_side"]
    for q, expected in zip(content["queries"], cam.maps, strict=True):
        small = F.adaptive_avg_pool2d(expected[None, None], side)[0, 0]
        np.testing.assert_allclose(_unpack(q["cam"]).reshape(side, side), _scaled(small), atol=1.01)
    assert content["weights_sentence"].startswith("Weights from a checkpoint")


def test_a_pretrained_head_is_named_and_a_replaced_one_is_not():
    from featurescope.pages._analysis import head_classes

    model = fs.create_model("resnet18", num_classes=1000)
    meta = fs.model_metadata(model)
    fs.zoo.attach_metadata(model, meta.replace(weights="torchvision:IMAGENET1K_V1"))
    names = head_classes(model)
    assert len(names) == 1000 and names[0] == "tench"
    fresh = fs.create_model("resnet18", num_classes=5)  # a new 5-class head on any backbone
    meta = fs.model_metadata(fresh)
    fs.zoo.attach_metadata(fresh, meta.replace(weights="torchvision:IMAGENET1K_V1"))
    assert head_classes(fresh) is None
    assert fs.study.weights_sentence("torchvision:IMAGENET1K_V1") == (
        "Pretrained weights: torchvision:IMAGENET1K_V1."
    )


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


def _photos(root):
    """A user's folder: real photos, flat and nested, in several formats and modes."""
    from PIL import Image
    from skimage import data as images

    (root / "trip").mkdir(parents=True)

    def small(name, size=(96, 72)):
        return Image.fromarray(getattr(images, name)()).resize(size)

    small("chelsea").save(root / "chelsea.webp")
    small("astronaut").save(root / "astronaut.png")
    small("coffee").save(root / "coffee.jpg")
    small("rocket").save(root / "rocket.bmp")
    small("camera").save(root / "trip" / "camera.tiff")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: a viewer turns it upright
    stripes = np.zeros((40, 80, 3), np.uint8)
    stripes[:, :40] = (220, 30, 30)
    stripes[:, 40:] = (30, 30, 220)
    Image.fromarray(stripes).save(root / "trip" / "rotated.jpg", exif=exif, quality=95)
    deep = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(deep).save(root / "deep.png")  # 16-bit grey: a plain convert clips it white
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return _photos(tmp_path_factory.mktemp("user") / "photos")


@pytest.fixture(scope="module")
def photo_search(photos):
    return fs.ImageSearch.build(fs.create_model("alexnet_half"), photos, progress=False)


class _VisibleText(HTMLParser):
    """The text a reader sees: everything outside <script>, <style> and <title>."""

    def __init__(self):
        super().__init__()
        self.skip, self.parts = 0, []

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style", "title")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style", "title")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def test_queries_in_the_gallery_leave_themselves_out_as_a_brute_force_does(
    photo_search, photos, tmp_path
):
    outside = tmp_path / "outside.png"
    shutil.copy(photos / "astronaut.png", outside)  # the same pixels, but not the gallery's file
    where = photo_search.image_paths()
    queries = [where[i] for i in sorted(where)] + [str(outside)]
    page = write_explorer(tmp_path / "x.html", photo_search, queries, k=10, projection="pca")
    content = _page_data(page)
    gallery = photo_search.index.vectors.double()
    ids = photo_search.index.ids.tolist()
    vectors = photo_search.embed_images(queries).double()
    assert [q["id"] for q in content["queries"]] == [*sorted(where), None]
    k = len(ids) - 1  # -k 10 cut to what a query in the gallery can have
    assert content["k"] == k
    for q, vector in zip(content["queries"], vectors, strict=True):
        distances = torch.sqrt(((gallery - vector) ** 2).sum(1)).tolist()
        expected = sorted((d, i) for d, i in zip(distances, ids, strict=True) if i != q["id"])[:k]
        assert [i for i, _ in q["neighbours"]] == [i for _, i in expected]
        np.testing.assert_allclose(
            [d for _, d in q["neighbours"]], [d for d, _ in expected], atol=1e-3
        )
    # The copy outside the gallery finds the original at distance 0, which is right.
    last = content["queries"][-1]["neighbours"][0]
    assert Path(where[last[0]]).name == "astronaut.png" and last[1] == pytest.approx(0, abs=1e-3)

    kept = _page_data(
        write_explorer(
            tmp_path / "k.html", photo_search, queries[:2], k=3, keep_self=True, projection="pca"
        )
    )
    assert [q["neighbours"][0][0] for q in kept["queries"]] == sorted(where)[:2]
    assert kept["queries"][0]["neighbours"][0][1] == pytest.approx(0, abs=1e-3)


def test_the_page_of_a_users_folder_speaks_of_its_files(photo_search, photos, tmp_path):
    index = photo_search.save(tmp_path / "photos.fsindex")
    assert json.loads((index / "search.json").read_text())["weights"] == "random"
    page = tmp_path / "photos.html"
    assert main(["explore", "--index", str(index), "--out", str(page), "-k", "3"]) == 0
    content = _page_data(page)
    names = {q["name"] for q in content["queries"]}
    assert names == {
        "chelsea.webp",
        "astronaut.png",
        "coffee.jpg",
        "rocket.bmp",
        "deep.png",
        "trip/camera.tiff",
        "trip/rotated.jpg",
    }
    assert {g["name"] for g in content["gallery"]} == names
    assert all(q["id"] not in [i for i, _ in q["neighbours"]] for q in content["queries"])
    text = _VisibleText()
    text.feed(page.read_text(encoding="utf-8"))
    visible = " ".join(text.parts).lower()
    assert "training" not in visible and "test image" not in visible
    assert "predicted" not in visible  # random weights: no prediction to speak of
    assert "random weights" in visible and "images of photos/" in visible
    assert content["wording"]["gallery"] == "images of photos/"
    kept = tmp_path / "kept.html"
    argv = ["explore", "--index", str(index), "--out", str(kept), "-k", "2", "--keep-self"]
    assert main(argv) == 0
    firsts = [(q["id"], *q["neighbours"][0]) for q in _page_data(kept)["queries"]]
    assert all(own == first and distance < 1e-3 for own, first, distance in firsts)


def test_the_demo_keeps_the_studys_wording(search, data, tmp_path):
    test = fs.ImageFolder(data / "test")
    page = write_explorer(
        tmp_path / "s.html", search, test.paths[:2], k=2, splits=("test", "training")
    )
    text = _VisibleText()
    text.feed(page.read_text(encoding="utf-8"))
    visible = " ".join(" ".join(text.parts).split())
    assert "Click a test image: its 2 nearest training images, nearest first" in visible


def test_stage_names_come_from_the_models_metadata(tmp_path, photos):
    model = fs.create_model("resnet18")
    search = fs.ImageSearch.build(model, photos, progress=False)
    paths = search.index.metadata[:2]
    content = _page_data(write_explorer(tmp_path / "r.html", search, paths, k=2, max_channels=4))
    stages = fs.model_metadata(model).stage_nodes
    assert [s["name"] for s in content["stages"]] == list(stages)
    sides = [s["shape"][-1] for s in content["stages"]]
    assert [s["label"] for s in content["stages"]] == [
        f"stage {i + 1} ({side}×{side})" for i, side in enumerate(sides)
    ]
    assert max(max(s["shipped"][1:]) for s in content["stages"]) <= 32


def test_pictures_are_read_as_the_model_reads_them(photo_search, photos, tmp_path):
    from PIL import Image, ImageOps

    from featurescope.data.folders import load_rgb
    from featurescope.pages._encode import THUMB

    where = photo_search.image_paths()
    query = where[next(i for i, p in where.items() if p.endswith("coffee.jpg"))]
    content = _page_data(write_explorer(tmp_path / "d.html", photo_search, [query], k=6))
    for g in content["gallery"]:
        if not g["name"].endswith(("rotated.jpg", "deep.png")):
            continue
        url = content["images"][g["image"]]
        shown = np.asarray(
            Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"),
            dtype=float,
        )
        model_view = np.asarray(ImageOps.fit(load_rgb(g["path"]), (THUMB, THUMB)), dtype=float)
        naive = np.asarray(
            ImageOps.fit(Image.open(g["path"]).convert("RGB"), (THUMB, THUMB)), dtype=float
        )
        assert np.abs(shown - model_view).mean() < 6  # JPEG's loss, no more
        assert np.abs(shown - naive).mean() > 30  # upright (and not clipped white)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(2, 12),
    duplicates=st.integers(0, 3),
    picks=st.lists(st.integers(-2, 11), min_size=1, max_size=6),
    k=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_self_exclusion_is_a_brute_force_without_the_query(
    search, rows, duplicates, picks, k, seed
):
    """Queries that are gallery files (some of them duplicates of other vectors) and queries
    that are not: each leaves out exactly its own id, ties going to the smaller id."""
    from featurescope.pages._build import _exclusions

    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randint(-3, 4, (rows, 3), generator=generator).float()
    vectors[:duplicates] = vectors[rows - 1]  # exact duplicates: ties at distance 0
    ids = torch.randperm(100, generator=generator)[:rows]
    index = fs.EmbeddingIndex(3)
    index.add(vectors, ids=ids, metadata=[f"/photos/{i}.png" for i in ids.tolist()])
    search = fs.ImageSearch(search.model, index, node="fc.4")  # the model is not used
    paths = [
        f"/photos/{ids[p].item()}.png" if 0 <= p < rows else f"/elsewhere/{p}.png" for p in picks
    ]
    queries = torch.stack(
        [vectors[p] if 0 <= p < rows else torch.full((3,), float(p)) for p in picks]
    )
    own = search.gallery_ids(paths)
    assert own == [ids[p].item() if 0 <= p < rows else None for p in picks]
    k = min(k, rows - 1)
    result = index.search(queries, k, exclude_ids=_exclusions(search, own))
    for query, mine, got in zip(queries.double(), own, result.ids.tolist(), strict=True):
        distances = ((vectors.double() - query) ** 2).sum(1).tolist()
        expected = sorted((d, i) for d, i in zip(distances, ids.tolist(), strict=True) if i != mine)
        assert got == [i for _, i in expected[:k]]
