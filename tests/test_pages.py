"""featurescope.pages: the explorer's data checked as a structure (no HTML scraping), the one
tap pass per batch, pictures shipped once, the Units section against featurescope.units and a
manual forward, and the templates' shared stylesheet, escaping and CSP."""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from html.parser import HTMLParser
from typing import get_type_hints

import numpy as np
import pytest
import torch

import featurescope as fs
from featurescope import pages
from featurescope.units import patch, top_activations


def _unpack(b64):
    return np.frombuffer(zlib.decompress(base64.b64decode(b64)), dtype=np.uint8)


def _scaled(values):
    """A textbook min-max scaling to 0..255 of one map, as float64."""
    values = values.double()
    span = values.max() - values.min()
    return ((values - values.min()) / span * 255).numpy() if span > 0 else np.zeros(values.shape)


class _Elements(HTMLParser):
    """Every element's tag, attributes and text, as the browser's parser reads them."""

    def __init__(self):
        super().__init__()
        self.elements, self._open = [], []

    def handle_starttag(self, tag, attrs):
        entry = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(entry)
        if tag not in ("meta", "img", "br", "input", "link"):
            self._open.append(entry)

    def handle_endtag(self, tag):
        if self._open and self._open[-1]["tag"] == tag:
            self._open.pop()

    def handle_data(self, data):
        if self._open:
            self._open[-1]["text"] += data


def _elements(text):
    parser = _Elements()
    parser.feed(text)
    parser.close()
    return parser.elements


@pytest.fixture(scope="module")
def search(image_search):
    return image_search


@pytest.fixture(scope="module")
def test_images(search_data):
    return fs.data.ImageFolder(search_data / "test")


@pytest.fixture(scope="module")
def data(search, test_images):
    return pages.build_explorer_data(
        search, test_images.paths, query_labels=test_images.targets, k=3, projection="pca"
    )


def _check_keys(value, typed):
    assert set(value) == set(get_type_hints(typed)), typed.__name__


def test_the_data_is_the_documented_plain_structure(data):
    assert json.loads(json.dumps(data)) == data  # plain JSON, nothing else
    _check_keys(data, pages.ExplorerData)
    _check_keys(data["wording"], pages.Wording)
    _check_keys(data["projection"], pages.Projection)
    for query in data["queries"]:
        _check_keys(query, pages.Query)
    for image in data["gallery"]:
        _check_keys(image, pages.GalleryImage)
    for stage in data["stages"]:
        _check_keys(stage, pages.Stage)
        for entry in stage["maps"]:
            _check_keys(entry, pages.MapEntry)
    assert data["units"] is None


def test_one_tap_pass_per_batch_gives_embedding_maps_and_scores(search, test_images):
    """conv1's convolution runs once per batch of queries: embedding, stage maps and class scores together."""
    calls = []

    def count(module, inputs, output):
        if isinstance(inputs[0], torch.Tensor):  # not the tracer's proxies
            calls.append(inputs[0].shape[0])

    handle = search.model.conv1[0].register_forward_hook(count)
    try:
        data = pages.build_explorer_data(
            search, test_images.paths, k=2, batch_size=2, projection="pca"
        )
    finally:
        handle.remove()
    assert calls == [2, 2, 1]  # 5 queries by twos, each batch once
    expected = search.embed_images(test_images.paths)
    got = search.index.search(expected, 2)
    assert [[i for i, _ in q["neighbours"]] for q in data["queries"]] == got.ids.tolist()


def test_every_picture_travels_once(search, search_data):
    """Queries that are gallery files: their gallery entries reuse the query's picture."""
    where = search.image_paths()
    own = sorted(where)[:3]
    data = pages.build_explorer_data(search, [where[i] for i in own], k=4, projection="pca")
    by_id = {g["id"]: g for g in data["gallery"]}
    for position, (query, gid) in enumerate(zip(data["queries"], own, strict=True)):
        assert query["image"] == position and query["id"] == gid
        if gid in by_id:
            assert by_id[gid]["image"] == position
    used = [q["image"] for q in data["queries"]]
    used += [g["image"] for g in data["gallery"] if g["id"] not in own]
    assert sorted(used) == list(range(len(data["images"])))  # each picture named exactly once


def _units_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 5, 3, padding=1),
        torch.nn.ReLU(),
    ).eval()


def test_units_page_against_top_activations_patches_and_a_manual_forward(tmp_path):
    model = _units_model()
    images = torch.rand(7, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    page = pages.write_units_page(
        tmp_path / "u.html", model, images, ["1", "4"], k=3, project_top=2
    )
    units = pages.read_explorer_data(page)["units"]
    _check_keys(units, pages.Units)
    expected = top_activations(model, images, ["1", "4"], k=3)
    assert [s["name"] for s in units["stages"]] == ["1", "4"]
    ids = sorted({int(i) for t in expected.values() for i in t.image_ids.flatten()})
    assert [s["name"] for s in units["sources"]] == [f"image {i}" for i in ids]
    with torch.no_grad():
        maps = {"1": model[:2](images), "4": model(images)}
    for stage in units["stages"]:
        _check_keys(stage, pages.UnitStage)
        top = expected[stage["name"]]
        assert stage["channels"] == top.values.shape[0] == len(stage["units"])
        assert stage["grid"] == list(top.grid)
        for unit in stage["units"]:
            _check_keys(unit, pages.Unit)
            c = unit["channel"]
            assert unit["tile"] == unit["top"][0]["patch"]
            for rank, example in enumerate(unit["top"]):
                _check_keys(example, pages.UnitExample)
                image = ids[example["source"]]
                assert image == int(top.image_ids[c, rank])
                row, col = (int(v) for v in top.positions[c, rank])
                assert example["position"] == [row, col]
                assert example["value"] == pytest.approx(float(top.values[c, rank]), rel=1e-4)
                if stage["name"] == "1":  # a 3x3 convolution, stride 1: the textbook box
                    assert example["box"] == [row, col, row + 3, col + 3]
                else:  # 3x3 conv, 2x2 pool, 3x3 conv padded: (row*2 - 2) .. (row*2 + 6)
                    top_, left = max(0, 2 * row - 2), max(0, 2 * col - 2)
                    assert example["box"] == [
                        top_,
                        left,
                        min(12, 2 * row + 6),
                        min(12, 2 * col + 6),
                    ]
                projected = example["deconvnet"] is not None and example["guided"] is not None
                assert projected == (rank < 2)
                np.testing.assert_allclose(
                    _unpack(example["map"]).reshape(maps[stage["name"]].shape[-2:]),
                    _scaled(maps[stage["name"]][image, c]),
                    atol=1.01,
                )


def test_a_units_patch_is_the_receptive_field_as_the_model_saw_it(tmp_path):
    import io

    from PIL import Image

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 5, stride=5)).eval()
    images = torch.zeros(2, 3, 10, 10)
    images[1, :, 5:, 5:] = 1.0  # one bright corner: both channels' strongest is there or not
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    pre = fs.data.transforms.Preprocessing(resize=10, crop=10, mean=mean, std=std)
    page = pages.write_units_page(
        tmp_path / "p.html", model, images, ["0"], k=1, projections=(), preprocessing=pre
    )
    content = pages.read_explorer_data(page)
    for unit in content["units"]["stages"][0]["units"]:
        example = unit["top"][0]
        source = images[
            [int(s["name"].split()[1]) for s in content["units"]["sources"]][example["source"]]
        ]
        top_, left, bottom, right = example["box"]
        assert (bottom - top_, right - left) == (5, 5)
        expected = patch(source, tuple(example["box"]), mean=mean, std=std)
        url = content["images"][example["patch"]]
        shown = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        small = np.asarray(shown.resize((5, 5), Image.Resampling.BOX), dtype=float) / 255
        np.testing.assert_allclose(small, expected.permute(1, 2, 0).numpy(), atol=0.06)
        assert example["deconvnet"] is None and example["guided"] is None


def test_units_of_a_folder_are_named_by_path_and_bad_nodes_are_clear(tmp_path, search_data):
    model = fs.create_model("alexnet_half")
    page = pages.write_units_page(
        tmp_path / "f.html", model, search_data / "test", ["conv3"], k=2, projections=()
    )
    content = pages.read_explorer_data(page)
    names = {s["name"] for s in content["units"]["sources"]}
    assert names and all("/" in n and n.endswith(".png") for n in names)
    with torch.no_grad():
        shape = fs.FeatureTap(model.eval(), ["conv3"])(torch.zeros(1, 3, 227, 227))["conv3"].shape
    assert content["units"]["stages"][0]["channels"] == shape[1]
    assert len(content["units"]["stages"][0]["units"]) == shape[1]  # every channel a tile
    with pytest.raises(fs.FeaturescopeError, match="projection"):
        pages.UnitsSpec(["conv1"], projections=("lrp",))
    with pytest.raises(fs.FeaturescopeError, match=r"maps \[N, C, H, W\]"):
        pages.write_units_page(tmp_path / "x.html", model, search_data / "test", ["fc"], k=1)
    assert not (tmp_path / "x.html").exists()


def test_explorer_units_index_the_gallery_in_id_order(search, test_images, tmp_path):
    ids, gallery = pages.gallery_images(search)
    top = top_activations(search.model, gallery, ["conv3"], k=2)
    data = pages.build_explorer_data(
        search,
        test_images.paths[:1],
        k=2,
        projection="pca",
        units=pages.UnitsSpec(["conv3"], k=2, projections=(), top=top),
    )
    where = search.image_paths()
    stage = data["units"]["stages"][0]
    for unit in stage["units"][:5]:
        for rank, example in enumerate(unit["top"]):
            source = data["units"]["sources"][example["source"]]
            gid = ids[int(top["conv3"].image_ids[unit["channel"], rank])]
            assert source["name"] == search.display_name(where[gid])
            assert source["label"] == search.labels()[gid]


def test_every_page_inlines_the_one_stylesheet_and_allows_only_its_script(data, tmp_path):
    css = pages.stylesheet()
    assert pages.stylesheet_path().read_text(encoding="utf-8") == css
    explorer = _elements(pages.render_explorer(data))
    report = _elements(pages.render("report.html", title="r", sections=[], version="0"))
    for page in (explorer, report):
        assert [e["text"] for e in page if e["tag"] == "style"] == [css]
    (meta,) = [e for e in explorer if e["attrs"].get("http-equiv") == "Content-Security-Policy"]
    scripts = [e for e in explorer if e["tag"] == "script"]
    inline = [s["text"] for s in scripts if "type" not in s["attrs"]]
    assert len(inline) == 1
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    policy = meta["attrs"]["content"]
    assert (
        f"script-src 'sha256-{digest}'" in policy
        and "unsafe-inline" not in policy.split("script-src")[1]
    )
    assert "default-src 'none'" in policy
    (payload,) = [s["text"] for s in scripts if s["attrs"].get("id") == "fs-data"]
    assert json.loads(payload) == data


@pytest.mark.parametrize(
    "hostile",
    [
        "<!--<script>",
        "</script><img src=x onerror=alert(1)>",
        'it\'s "quoted"\nand\u2028',
        "\u202eevil",
    ],
)
def test_hostile_names_stay_text(data, hostile):
    mine = {**data, "title": hostile, "model": hostile}
    mine["queries"] = [{**q, "name": hostile} for q in data["queries"]]
    text = pages.render_explorer(mine)
    elements = _elements(text)
    assert [e["text"] for e in elements if e["tag"] == "title"] == [hostile]
    assert [e["text"] for e in elements if e["tag"] == "h1"] == [hostile]
    assert not [e for e in elements if "onerror" in e["attrs"]]  # no markup out of a name
    from featurescope.pages._render import parse

    assert parse(text)["queries"][0]["name"] == hostile
    assert sum(e["tag"] == "script" for e in elements) == 2


def test_the_report_tables_come_from_the_shared_macro(tmp_path):
    from featurescope.study.report import _Figures, _retrieval_section

    section = _retrieval_section(
        _Figures(tmp_path),
        {
            "k": 3,
            "trained": {"precision_at_1": 0.5, "precision_at_k": 0.25},
            "random_weights": {"precision_at_1": 0.2},
            "chance_precision": 0.2,
            "num_queries": 4,
            "gallery_size": 8,
            "model": "<net>",
        },
    )
    page = pages.render(
        "report.html",
        title="t",
        version="0",
        sections=[section],
        report={
            "preset": {"name": "p", "description": "d"},
            "data": {"root": "r", "classes": ["a"]},
            "sizes": "1 train",
            "total_seconds": 1.0,
            "explorer": None,
        },
    )
    cells = [e["text"] for e in _elements(page) if e["tag"] in ("td", "th")]
    assert cells[:3] == ["metric", "trained <net>", "random weights"]
    assert cells[3:6] == ["precision@1", "0.500", "0.200"]
    assert cells[9:12] == ["recall@3", "–", "–"]
    assert "Figure not produced" in page  # the figure file is not there: named, not linked


def test_units_spec_channels_keeps_each_nodes_strongest_channels_in_order() -> None:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU())
    images = torch.rand(5, 3, 9, 9)
    top = top_activations(model, images, ["1"], k=2)
    strongest = top["1"].values[:, 0].double()
    expected = sorted(torch.argsort(-strongest, stable=True)[:3].tolist())
    pictures: list[str] = []
    units = pages.build_units(
        model, images, pages.UnitsSpec(["1"], k=2, channels=3, project_top=1), pictures
    )
    (stage,) = units["stages"]
    assert [u["channel"] for u in stage["units"]] == expected
    assert stage["channels"] == 6
    shown_ids = {int(i) for c in expected for i in top["1"].image_ids[c].tolist()}
    assert len(units["sources"]) == len(shown_ids)
    with pytest.raises(fs.FeaturescopeError, match="channels must be a positive integer"):
        pages.UnitsSpec(["1"], channels=0)
