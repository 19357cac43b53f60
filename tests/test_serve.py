"""The web app as a real server on a loopback port: its JSON API against the library's own
answers, and every limit and bad request it must refuse with a clear 4xx.

References are independent of the app: neighbours from ``ImageSearch.search_images``, maps from
forward hooks on the model's modules scaled by the textbook min-max formula, the map's PCA from
numpy's SVD, the units from ``top_activations`` and ``receptive_field``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

import featurescope as fs
from _serve_helpers import UNIT_NODE, call, post_json, tiny_search
from featurescope import pages
from featurescope.data.folders import load_rgb
from featurescope.errors import FeaturescopeError, FeaturescopeWarning
from featurescope.serve import Limits, create_app, running

pytest.importorskip("starlette", reason="the serve extra is not installed")
pytest.importorskip("uvicorn", reason="the serve extra is not installed")

LIMITS = Limits(max_bytes=64_000, max_pixels=250_000)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    search, test, units = tiny_search(tmp_path_factory.mktemp("serve") / "data")
    with running(create_app(search, k=4, units=units, limits=LIMITS)) as url:
        yield url, search, fs.data.ImageFolder(test), units


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise(side: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


# -- the page ------------------------------------------------------------------------------------


class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.links: list[dict[str, str | None]] = []
        self.styles = 0
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts.append(dict(attrs))
            self._in_script = True
        self.links += [dict(attrs)] if tag == "link" else []
        self.styles += tag == "style"
        for name, _ in attrs:
            if name.startswith("on") or name == "style":
                self.inline.append(f"{tag} {name}")

    def handle_endtag(self, tag):
        self._in_script = tag != "script" and self._in_script

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline.append(data)


def test_page_loads_its_script_as_a_file_under_a_strict_csp(served):
    url = served[0]
    status, headers, body = call(url, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    parser = _Scripts()
    parser.feed(body.decode())
    assert [s.get("src") for s in parser.scripts] == ["/static/serve.js"]
    assert parser.inline == []  # no inline script, handler or style: the CSP would block them
    status, headers, script = call(url, "GET", "/static/serve.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert b"/api/map.bin" in script and "content-security-policy" in headers


def test_page_links_the_one_stylesheet_every_page_shares(served):
    url = served[0]
    _, _, body = call(url, "GET", "/")
    parser = _Scripts()
    parser.feed(body.decode())
    sheets = [link.get("href") for link in parser.links if link.get("rel") == "stylesheet"]
    assert sheets == ["/static/featurescope.css"] and parser.styles == 0
    status, headers, css = call(url, "GET", "/static/featurescope.css")
    assert status == 200 and headers["content-type"].startswith("text/css")
    # The explorer's and the report's stylesheet, byte for byte.
    assert css == pages.stylesheet().encode("utf-8")
    assert "style-src 'self'" in headers["content-security-policy"]
    status, _, _ = call(url, "GET", "/static/serve.css")  # the app's own stylesheet is gone
    assert status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/nowhere",
        "/static/../__init__.py",
        "/static/..%2F__init__.py",
        "/static/_app.py",
        "/api/image/..%2F..%2Fetc%2Fpasswd",
        "/api/image/-1",
        "/api/image/abc",
        "/api/image/99999",
        "/api/gallery/99999",
    ],
)
def test_unknown_paths_and_ids_are_404_with_the_csp(served, path):
    url = served[0]
    status, headers, body = call(url, "GET", path)
    assert status == 404, body
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert b"root:" not in body and b"import" not in body


def test_a_foreign_host_name_is_refused(served):
    """A page elsewhere that rebinds its DNS name to 127.0.0.1 sends its own Host."""
    status, headers, _ = call(served[0], "GET", "/api/info", headers={"host": "evil.example"})
    assert status == 400 and "content-security-policy" in headers


# -- searching -----------------------------------------------------------------------------------


def test_an_uploaded_photo_gets_exactly_search_images_answer(served):
    url, search, test, _ = served
    for path, target in zip(test.paths[:3], test.targets[:3], strict=True):
        name = search.class_names[target]
        status, answer = post_json(url, f"/api/search?k=5&label={name}", Path(path).read_bytes())
        assert status == 200, answer
        expected = search.search_images([path], k=5)
        assert [h["id"] for h in answer["neighbours"]] == expected.ids[0].tolist()
        assert [h["distance"] for h in answer["neighbours"]] == pytest.approx(
            expected.distances[0].tolist(), rel=1e-6
        )
        labels = search.labels()
        assert [h["hit"] for h in answer["neighbours"]] == [
            labels[i] == target for i in expected.ids[0].tolist()
        ]
        assert [h["class"] for h in answer["neighbours"]] == [
            search.class_names[labels[i]] for i in expected.ids[0].tolist()
        ]


def test_a_path_in_the_gallery_is_searched_and_marks_its_own_class(served):
    url, search, _, _ = served
    gid, path = next(iter(search.image_paths().items()))
    relative = os.path.relpath(path, search.root)
    status, answer = post_json(
        url, "/api/search?k=3", json.dumps({"path": relative}).encode(), "application/json"
    )
    assert status == 200, answer
    expected = search.search_images([path], k=3).ids[0].tolist()
    assert [h["id"] for h in answer["neighbours"]] == expected and expected[0] == gid
    assert answer["label"] == search.labels()[gid]
    assert [h["hit"] for h in answer["neighbours"]] == [
        search.labels()[i] == search.labels()[gid] for i in expected
    ]


def test_paths_outside_the_gallery_are_refused(served, tmp_path):
    url, search, _, _ = served
    secret = tmp_path / "secret.png"
    secret.write_bytes(png(noise(8)))
    link = search.root / "escape.png"
    link.symlink_to(secret)
    try:
        for text in ("../../../../../../etc/passwd", str(secret), "escape.png", "../" * 3):
            status, answer = post_json(
                url, "/api/search", json.dumps({"path": text}).encode(), "application/json"
            )
            assert status == 403 and "outside the gallery" in answer["error"], (text, answer)
    finally:
        link.unlink()
    status, answer = post_json(url, "/api/search", b'{"path": "no/such.png"}', "application/json")
    assert status == 404 and "no image file" in answer["error"]
    status, answer = post_json(url, "/api/search", b'{"file": 3}', "application/json")
    assert status == 422 and '{"path": "..."}' in answer["error"]


def test_a_gallery_point_gets_its_exact_neighbours_without_itself(served):
    url, search, _, _ = served
    gid = search.index.ids[4].item()
    status, _, raw = call(url, "GET", f"/api/gallery/{gid}?k=4")
    answer = json.loads(raw)
    assert status == 200 and answer["id"] == gid
    vector = search.index.vectors[4][None]
    expected = search.index.search(vector, 4, exclude_ids=[[gid]])
    assert [h["id"] for h in answer["neighbours"]] == expected.ids[0].tolist()
    assert gid not in expected.ids[0].tolist()


def test_gallery_images_are_served_by_id(served):
    url, search, _, _ = served
    gid, path = next(iter(search.image_paths().items()))
    status, headers, raw = call(url, "GET", f"/api/image/{gid}?size=64")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(raw))
    assert max(thumb.size) <= 64 and thumb.size[0] / thumb.size[1] == pytest.approx(
        load_rgb(path).size[0] / load_rgb(path).size[1], rel=0.05
    )
    status, headers, raw = call(url, "GET", f"/api/image/{gid}?view=model")
    seen = np.asarray(Image.open(io.BytesIO(raw)), dtype=np.float32) / 255
    tensor = search.preprocessing.transform()(load_rgb(path))
    reference = search.preprocessing.denormalize(tensor).clamp(0, 1).permute(1, 2, 0).numpy()
    assert status == 200 and np.abs(seen - reference).max() <= 1 / 255 + 1e-6


# -- limits and bad uploads ----------------------------------------------------------------------


def test_too_many_bytes_is_413_by_declared_length(served):
    status, answer = post_json(served[0], "/api/search", os.urandom(LIMITS.max_bytes + 1))
    assert status == 413 and f"{LIMITS.max_bytes:,} bytes" in answer["error"]


def test_too_many_bytes_is_413_when_streamed_without_a_length(served):
    chunks = (os.urandom(16_000) for _ in range(LIMITS.max_bytes // 16_000 + 2))
    status, headers, raw = call(
        served[0], "POST", "/api/analyse", chunks, {"content-type": "image/png"}
    )
    assert status == 413 and "larger than" in json.loads(raw)["error"]
    assert "content-security-policy" in headers


def test_a_decompression_bomb_is_refused_before_it_decodes(served):
    bomb = png(Image.new("L", (700, 700)))  # 490,000 pixels in under 2 kB
    assert len(bomb) < 5_000
    for route in ("/api/search", "/api/analyse"):
        status, answer = post_json(served[0], route, bomb)
        assert status == 413 and "too large to decode safely (700x700" in answer["error"]


def test_pils_own_bomb_check_is_a_413_too(served, monkeypatch):
    """Past PIL's limit, PIL itself refuses at open: still a clear 413."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    status, answer = post_json(served[0], "/api/search", png(Image.new("L", (60, 60))))
    assert status == 413 and "too large to decode safely" in answer["error"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"", 400, "carries no image"),
        (b"hello, this is not a photo", 415, "not an image"),
        (b"%PDF-1.4\n" + b"0" * 100, 415, "not an image"),
        (png(noise(96))[:3000], 422, "does not decode"),
    ],
)
def test_what_is_not_a_photo_gets_a_clear_4xx(served, body, status, words):
    for route in ("/api/search", "/api/analyse"):
        got, answer = post_json(served[0], route, body)
        assert got == status and words in answer["error"], answer


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("k=0", "k must be between 1 and 15"),
        ("k=99", "k must be"),
        ("k=x", "whole number"),
        ("label=dragon", "not one of the gallery's classes"),
    ],
)
def test_bad_parameters_are_422(served, query, words):
    status, answer = post_json(served[0], f"/api/search?{query}", png(noise(48)))
    assert status == 422 and words in answer["error"]


def test_nothing_uploaded_is_written_to_disk(served, tmp_path, monkeypatch):
    """Uploads are read into memory only: no temporary file is created while serving one."""
    import tempfile

    made = []
    for name in ("NamedTemporaryFile", "SpooledTemporaryFile", "TemporaryFile", "mkstemp"):
        original = getattr(tempfile, name)
        monkeypatch.setattr(
            tempfile, name, lambda *a, _o=original, _n=name, **k: made.append(_n) or _o(*a, **k)
        )
    status, _ = post_json(served[0], "/api/search", png(noise(48)))
    assert status == 200 and made == []


# -- a photo's insides ---------------------------------------------------------------------------


def _reference_outputs(model, tensor, modules):
    outputs = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, _n=name: outputs.__setitem__(_n, out.detach().clone())
        )
        for name in modules
    ]
    try:
        with torch.no_grad():
            logits = model.eval()(tensor[None])
    finally:
        for hook in hooks:
            hook.remove()
    return outputs, logits


def _min_max_255(maps: np.ndarray) -> np.ndarray:
    flat = maps.reshape(maps.shape[0], -1).astype(np.float64)
    lo, hi = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.where(hi > lo, np.round((flat - lo) / span * 255), 0).reshape(maps.shape)


def test_analyse_sends_every_stage_channel_by_channel_and_the_grad_cam(served):
    url, search, test, _ = served
    path = test.paths[2]
    status, answer = post_json(url, "/api/analyse", Path(path).read_bytes())
    assert status == 200, answer
    tensor = search.preprocessing.transform()(load_rgb(path))
    outputs, logits = _reference_outputs(search.model, tensor, ["conv1", "conv2", "conv3"])
    assert [s["name"] for s in answer["stages"]] == ["conv1", "conv2", "conv3"]
    for stage in answer["stages"]:
        maps = outputs[stage["name"]][0].numpy()
        assert stage["shape"] == list(maps.shape) == stage["shipped"]  # small: not pooled
        tiles = np.frombuffer(base64.b64decode(stage["tiles"]), np.uint8).reshape(maps.shape)
        assert np.abs(tiles.astype(int) - _min_max_255(maps)).max() <= 1
        summed = np.frombuffer(base64.b64decode(stage["sum"]), np.uint8)
        assert np.abs(summed.astype(int) - _min_max_255(maps.sum(0)[None]).ravel()).max() <= 1
        assert stage["means"] == pytest.approx(maps.mean(axis=(1, 2)).tolist(), rel=1e-3, abs=1e-6)
    predicted = int(logits[0].argmax())
    assert answer["predicted"]["label"] == predicted
    assert answer["predicted"]["probability"] == pytest.approx(
        float(torch.softmax(logits[0], 0)[predicted]), rel=1e-4
    )
    cam = fs.tap.grad_cam(search.model, tensor[None], target=predicted)
    assert answer["cam_node"] == cam.node
    side = answer["cam_side"]
    small = torch.nn.functional.adaptive_avg_pool2d(cam.maps[None], side)[0, 0].numpy()
    expected = np.round(small / small.max() * 255)
    got = np.frombuffer(base64.b64decode(answer["cam"]), np.uint8).reshape(side, side)
    assert np.abs(got.astype(int) - expected).max() <= 1
    photo = Image.open(io.BytesIO(base64.b64decode(answer["photo"].split(",", 1)[1])))
    assert photo.size == tuple(answer["input_size"][::-1]) == (227, 227)


def test_the_units_a_photo_excites_most_and_their_top_gallery_images(served):
    url, search, test, units = served
    path = test.paths[0]
    status, answer = post_json(url, "/api/analyse", Path(path).read_bytes())
    assert status == 200, answer
    tensor = search.preprocessing.transform()(load_rgb(path))
    outputs, _ = _reference_outputs(search.model, tensor, [UNIT_NODE])
    scores = outputs[UNIT_NODE][0].flatten(1).amax(dim=1)
    (node,) = answer["units"]
    strongest = sorted(range(len(scores)), key=lambda c: (-scores[c].item(), c))[:6]
    assert node["node"] == UNIT_NODE and [u["channel"] for u in node["channels"]] == strongest
    top = units[UNIT_NODE]
    field = fs.tap.receptive_field(search.model, UNIT_NODE, (227, 227))
    ids = search.index.ids.tolist()
    for unit in node["channels"]:
        c = unit["channel"]
        assert unit["value"] == pytest.approx(scores[c].item(), rel=1e-5)
        assert [t["id"] for t in unit["top"]] == [ids[p] for p in top.image_ids[c].tolist()]
        assert [t["box"] for t in unit["top"]] == [
            list(field.box(i, j)) for i, j in top.positions[c].tolist()
        ]


def test_the_gallery_map_is_the_pca_of_its_embeddings(served):
    url, search, _, _ = served
    status, _, meta = call(url, "GET", "/api/map")
    assert status == 200 and json.loads(meta)["method"] in ("PCA", "UMAP")
    status, _, raw = call(url, "GET", "/api/map.bin")
    n = struct.unpack_from("<I", raw)[0]
    assert status == 200 and n == len(search.index) and len(raw) == 4 + 12 * n
    ids = np.frombuffer(raw, "<i4", n, 4)
    xy = np.frombuffer(raw, "<f4", 2 * n, 4 + 4 * n).reshape(n, 2)
    assert ids.tolist() == search.index.ids.tolist()
    if json.loads(meta)["method"] == "PCA":
        x = search.index.vectors.double().numpy()
        centred = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        reference = centred @ vt[:2].T
        signs = np.sign((reference * xy).sum(axis=0))  # the axes' signs are a convention
        assert np.allclose(xy, reference * signs, atol=1e-4 * np.abs(reference).max())


def test_concurrent_searches_share_one_index_and_agree(served):
    """A few at once here (the load test sends 200): each answer is its own photo's."""
    from concurrent.futures import ThreadPoolExecutor

    url, search, test, _ = served
    paths = test.paths[:4]
    bodies = [Path(p).read_bytes() for p in paths]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: post_json(url, "/api/search?k=3", b), bodies * 2))
    expected = [search.search_images([p], k=3).ids[0].tolist() for p in paths] * 2
    assert [[h["id"] for h in a["neighbours"]] for _, a in answers] == expected


# -- the Python entry points ---------------------------------------------------------------------


def test_a_missing_extra_names_the_install_command(monkeypatch):
    from featurescope.serve import check_installed

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(FeaturescopeError, match=r"pip install 'featurescope\[serve\]'"):
        check_installed()


def test_serving_beyond_loopback_warns_and_answers_any_host(served, monkeypatch):
    import featurescope.serve as serve_module

    search = served[1]
    seen: dict = {}

    class NoServer:
        def run(self, sockets):
            seen["ran"] = sockets

    def fake_server(app, log_level):
        seen["app"] = app
        return NoServer()

    monkeypatch.setattr(
        serve_module,
        "_bind",
        lambda host, port: serve_module.socket.create_server(("127.0.0.1", 0)),
    )
    monkeypatch.setattr(serve_module, "_server", fake_server)
    with pytest.warns(FeaturescopeWarning, match="not 127.0.0.1"):
        search.serve(host="0.0.0.0", port=0, ready=seen.setdefault)
    assert "ran" in seen
    assert not any("TrustedHost" in str(m) for m in seen["app"].user_middleware)
    assert serve_module.is_loopback("::1") and not serve_module.is_loopback("192.168.1.2")


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path, capsys):
    from featurescope.cli import main

    assert main(["serve", str(tmp_path / "nowhere.fsindex")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"featurescope serve: error: INDEX '{tmp_path / 'nowhere.fsindex'}' does not exist"
    ]
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 1
    assert "--port must be between 0 and 65535" in capsys.readouterr().err


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(3, 40),
    dim=st.integers(2, 24),
    seed=st.integers(0, 2**16),
)
def test_pca_2d_is_numpys_svd_both_ways(n, dim, seed):
    """Fewer points than dimensions (the points' SVD) or more (the covariance's eigenvectors):
    the same first two components as numpy's SVD, each axis's sign fixed by its largest
    loading."""
    from featurescope.pages import pca_2d

    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * torch.linspace(
        3, 0.5, dim
    )
    centred = x.double().numpy() - x.double().numpy().mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    assume(s[0] - s[1] > 1e-3 * s[0] and (len(s) < 3 or s[1] - s[2] > 1e-3 * s[0]))
    axes = vt[:2].T * np.sign(vt[:2].T[np.abs(vt[:2].T).argmax(axis=0), [0, 1]])
    assert np.allclose(pca_2d(x).numpy(), centred @ axes, atol=1e-8 * max(1.0, s[0]))
