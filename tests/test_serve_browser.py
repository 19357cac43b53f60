"""The app's page in a real headless browser (Debian's chromium through Playwright), served by a
real uvicorn server on a loopback port.

Uploads a photo through the page's file input and checks that the neighbours shown are exactly
``search_images``' answer, hits marked by the chosen class; clicks a channel tile and reads the
large canvas's pixels back against the channel computed by a forward hook; clicks a point of
the gallery's map and checks its neighbours. Fails on any console error, page error (a CSP
violation is one) or request to anywhere but the app.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import featurescope as fs
from _serve_helpers import call, tiny_search
from featurescope.data.folders import load_rgb
from featurescope.serve import create_app, running

pytestmark = pytest.mark.slow
pytest.importorskip("starlette", reason="the serve extra is not installed")

K = 4


def _chromium() -> str:
    for candidate in (os.environ.get("FEATURESCOPE_CHROMIUM", ""), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    pytest.skip("no chromium browser installed (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    search, test, units = tiny_search(tmp_path_factory.mktemp("serve-browser") / "data")
    with running(create_app(search, k=K, units=units)) as url:
        yield url, search, fs.data.ImageFolder(test)


@pytest.fixture(scope="module")
def browser():
    api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    executable = _chromium()
    with api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(
                executable_path=executable, headless=True, args=["--no-sandbox"]
            )
        except Exception as exc:
            pytest.skip(f"chromium at {executable} does not start: {exc}")
        yield browser
        browser.close()


def _channels(search, path, module):
    """Every channel's map of the module by a forward hook, ``[C, H, W]`` float64, unscaled."""
    tensor = search.preprocessing.transform()(load_rgb(path))
    seen = {}
    hook = getattr(search.model, module).register_forward_hook(
        lambda _m, _i, out: seen.setdefault("out", out.detach())
    )
    try:
        with torch.no_grad():
            search.model.eval()(tensor[None])
    finally:
        hook.remove()
    return seen["out"][0].double().numpy()


def test_the_page_searches_an_uploaded_photo_exactly(served, browser, tmp_path):
    url, search, test = served
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1300, "height": 1800})
    page.on("console", lambda m: m.type in ("error", "warning") and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on(
        "request",
        lambda r: (
            r.url.startswith(url)
            or r.url.startswith("data:")
            or problems.append(f"request for {r.url}")
        ),
    )
    page.goto(url)
    page.wait_for_selector("body[data-fs-ready='1'][data-fs-map]", timeout=30_000)

    # Upload a photo: the neighbours shown are search_images' answer, in order.
    path, target = test.paths[1], test.targets[1]
    page.set_input_files("#fs-file", path)
    page.wait_for_selector("#fs-search-results [data-fs-neighbour]", timeout=30_000)
    page.wait_for_selector("body[data-fs-ready='1']")
    shown = page.eval_on_selector_all(
        "#fs-search-results [data-fs-neighbour]", "ns => ns.map(n => +n.dataset.fsNeighbour)"
    )
    expected = search.search_images([path], k=K).ids[0].tolist()
    assert shown == expected

    # Naming the photo's class marks each neighbour a hit or a miss.
    page.select_option("#fs-label", search.class_names[target])
    page.wait_for_selector("#fs-search-results .fs-hit, #fs-search-results .fs-miss")
    page.wait_for_selector("body[data-fs-ready='1']")
    hits = page.eval_on_selector_all(
        "#fs-search-results [data-fs-neighbour]",
        "ns => ns.map(n => n.classList.contains('fs-hit'))",
    )
    labels = search.labels()
    assert hits == [labels[i] == target for i in expected]

    # A channel tile opens that channel: the large canvas holds exactly its values.
    stages = page.eval_on_selector_all(".fs-stage h3", "hs => hs.map(h => h.textContent)")
    assert [s.split(": ")[1].split(",")[0] for s in stages] == ["conv1", "conv2", "conv3"]
    # The channel with the widest range: the untrained net's random weights leave some channels
    # constant (the page draws those black), and min-max scaling needs a range to check.
    maps = _channels(search, path, "conv2")
    channel = int(np.ptp(maps.reshape(len(maps), -1), axis=1).argmax())
    page.click(f"[data-fs-channel='1:{channel}']")
    page.wait_for_selector(f"body[data-fs-drawn='1:{channel}']")
    drawn = page.evaluate(
        """() => { const c = document.getElementById('fs-channel-large');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        return [c.height, c.width, Array.from(d.filter((_, i) => i % 4 === 0))]; }"""
    )
    one = maps[channel]
    reference = np.round((one - one.min()) / (one.max() - one.min()) * 255)
    assert drawn[:2] == list(reference.shape)
    assert np.abs(np.array(drawn[2]).reshape(reference.shape) - reference).max() <= 1
    assert f"conv2 channel {channel}" in page.inner_text("#fs-channel-caption")

    # Grad-CAM and the units this photo excites are shown.
    assert "Grad-CAM of the predicted class" in page.inner_text("#fs-cam-caption")
    assert page.locator("#fs-units [data-fs-unit]").count() == 6

    # A point of the gallery's map: its image and its exact neighbours, itself left out.
    _, _, raw = call(url, "GET", "/api/map.bin")
    n = struct.unpack_from("<I", raw)[0]
    xy = np.frombuffer(raw, "<f4", 2 * n, 4 + 4 * n).reshape(n, 2).astype(np.float64)
    low, high = xy.min(axis=0), xy.max(axis=0)
    span, centre = (high - low).max(), (low + high) / 2
    scale = 0.92 * 640 / span  # the page's fit: the points' bounding square, 92 % of the canvas
    x, y = 320 + (xy[5, 0] - centre[0]) * scale, 320 - (xy[5, 1] - centre[1]) * scale
    page.locator("#fs-map").click(position={"x": x, "y": y})
    page.wait_for_selector("body[data-fs-point]")
    page.wait_for_selector("#fs-point-neighbours [data-fs-neighbour]")
    point = int(page.evaluate("document.body.dataset.fsPoint"))
    row = search.index.ids.tolist().index(point)
    assert np.abs(xy[row] - xy[5]).max() * scale <= 8  # the point under the cursor, or one on it
    near = page.eval_on_selector_all(
        "#fs-point-neighbours [data-fs-neighbour]", "ns => ns.map(n => +n.dataset.fsNeighbour)"
    )
    vector = search.index.vectors[row][None]
    assert near == search.index.search(vector, K, exclude_ids=[[point]]).ids[0].tolist()

    # A refused upload says why on the page.
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not really a picture")
    page.set_input_files("#fs-file", str(bad))
    page.wait_for_selector("#fs-status.fs-error")
    assert "not an image" in page.inner_text("#fs-status")

    # Every class the page's elements carry (the template's and the script's) is styled by the
    # shared stylesheet: a class renamed in one and not the other would fall back unstyled.
    unstyled = page.evaluate(
        """() => {
        const selectors = Array.from(document.styleSheets).flatMap(s => Array.from(s.cssRules))
          .map(r => r.selectorText || "").join(" ");
        const styled = new Set(selectors.match(/\\.fs-[a-z-]+/g).map(c => c.slice(1)));
        const used = new Set(Array.from(document.querySelectorAll("[class]"))
          .flatMap(e => Array.from(e.classList)));
        return Array.from(used).filter(c => !styled.has(c)).sort(); }"""
    )
    assert unstyled == []

    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("FEATURESCOPE_SCREENSHOT"):
        Path(os.environ["FEATURESCOPE_SCREENSHOT"]).write_bytes(shot.read_bytes())
    problems = [p for p in problems if "415" not in p]  # the refused upload's own console line
    assert problems == [], problems
    assert json.loads(call(url, "GET", "/api/info")[2])["units"] == ["conv2"]
