"""The explorer page in a real headless browser (Debian's chromium, driven by Playwright).

Fails on any console error, page error, or request for anything but the page's own
``file://`` URL and inline ``data:`` images. Clicks a query and checks that the neighbours shown
are exactly the index's answer; switches a channel and checks the drawn map changed; hides a
training run; clicks a projected point; clicks a unit tile and checks its patches are the
channel's top activations; saves a screenshot. Skips, saying why, where no
browser or no Playwright is installed (``.ci/run`` installs both).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import featurescope as fs
from featurescope.pages import UnitsSpec, gallery_images
from featurescope.study import write_explorer
from featurescope.study.explorer import read_explorer_data
from featurescope.units import top_activations

# A real browser over a built page: the slow lane.
pytestmark = pytest.mark.slow

CHROMIUM_CANDIDATES = (
    os.environ.get("FEATURESCOPE_CHROMIUM", ""),
    "/usr/bin/chromium",
    "/usr/bin/chromium-browser",
    "/usr/bin/google-chrome",
)


def _chromium() -> str:
    for candidate in CHROMIUM_CANDIDATES:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    pytest.skip(
        "no chromium browser installed (apt-get install -y chromium, or set "
        "FEATURESCOPE_CHROMIUM); the explorer's browser test cannot run"
    )


_COMPARISONS: dict = {}  # the comparison each page shows, by page path


@pytest.fixture(scope="module")
def page_and_search(tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer")
    data = fs.data.make_synthetic_dataset(
        root / "data", train_per_class=4, val_per_class=0, test_per_class=2, size=48
    )
    search = fs.ImageSearch.build(fs.create_model("alexnet_half"), data, progress=False)
    test = fs.data.ImageFolder(data / "test")
    runs = {
        "alexnet bs8": {
            "train_loss": [1.6, 1.2],
            "val_loss": [1.5, 1.3],
            "train_acc": [0.3, 0.5],
            "val_acc": [0.3, 0.4],
        },
        "alexnet bs16": {
            "train_loss": [1.6, 1.4],
            "val_loss": [1.6, 1.5],
            "train_acc": [0.2, 0.4],
            "val_acc": [0.2, 0.3],
        },
    }
    images = fs.data.ImageFolder(data / "test", search.preprocessing.transform())
    comparison = fs.compare(
        search.model,
        search.model,
        images,
        nodes_a=["conv1", "conv2", "fc"],
        nodes_b=["conv1", "conv2"],
        batch_size=5,
        progress=False,
    )
    similarity = {"comparisons": [{**comparison.to_dict(), "name": "alexnet_half with itself"}]}
    page = write_explorer(
        root / "explorer.html",
        search,
        test.paths,
        query_labels=test.targets,
        runs=runs,
        k=5,
        similarity=similarity,
        # Projections cost a backward pass each: the units page's own test draws them.
        units=UnitsSpec(["conv1", "conv3"], k=3, projections=()),
    )
    _COMPARISONS[page] = comparison
    return page, search, test


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install '.[test]')"
    )
    executable = _chromium()
    with playwright_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(
                executable_path=executable, headless=True, args=["--no-sandbox"]
            )
        except Exception as exc:  # a browser that cannot start here is a skip, with the reason
            pytest.skip(f"chromium at {executable} does not start: {exc}")
        yield browser
        browser.close()


def _open(browser, page_path, problems):
    """Open ``page_path``, recording console errors, page errors and any outside request."""
    url = page_path.resolve().as_uri()
    page = browser.new_page(viewport={"width": 1280, "height": 1800})
    page.on(
        "console",
        lambda m: (
            problems.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning")
            else None
        ),
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    def check_request(request):
        if request.url != url and not request.url.startswith("data:"):
            problems.append(f"request for {request.url}")

    page.on("request", check_request)
    page.goto(url)
    page.wait_for_selector("body[data-fs-ready='1']", timeout=20_000)
    return page


def test_explorer_in_a_real_browser(page_and_search, browser, tmp_path):
    page_path, search, test = page_and_search
    problems: list[str] = []
    page = _open(browser, page_path, problems)

    # Representation similarity: one cell per node pair, its hover text the exact value.
    comparison = _COMPARISONS[page_path]
    cells = page.eval_on_selector_all(
        "#fs-similarity [data-fs-cka]", "nodes => nodes.map(n => [n.dataset.fsCka, n.title])"
    )
    assert len(cells) == 3 * 2
    for where, title in cells:
        i, j = map(int, where.split(","))
        value = comparison.matrix[i, j].item()
        assert f"{comparison.nodes_a[i]} \u00d7 {comparison.nodes_b[j]}: CKA {value:.4f}" in title
        assert comparison.estimators[i][j] in title

    # Search by image: the neighbours shown are exactly the index's answer.
    query = 3
    page.click(f"[data-fs-query='{query}']")
    shown = page.eval_on_selector_all(
        "#fs-search-results [data-fs-neighbour]", "nodes => nodes.map(n => +n.dataset.fsNeighbour)"
    )
    expected = search.search_images([test.paths[query]], k=5).ids[0].tolist()
    assert shown == expected
    hits = page.eval_on_selector_all(
        "#fs-search-results [data-fs-neighbour]",
        "nodes => nodes.map(n => n.classList.contains('fs-hit'))",
    )
    labels = search.labels()
    assert hits == [labels[i] == test.targets[query] for i in expected]
    assert page.locator("[data-fs-query]").count() == len(test)

    # Feature maps: switching the channel redraws the channel's canvas (once inflated).
    before = page.evaluate("document.getElementById('fs-map-channel').toDataURL()")
    channels = page.eval_on_selector_all(
        "[data-fs-channel]", "nodes => nodes.map(n => n.dataset.fsChannel)"
    )
    assert channels[0].startswith("conv1:") and len(channels) == 48
    tags = page.eval_on_selector_all("[data-fs-channel]", "nodes => nodes.map(n => n.tagName)")
    assert set(tags) == {"CANVAS"}  # a grid of channel tiles, each the channel's small map
    page.click(f"[data-fs-channel='{channels[-1]}']")
    page.wait_for_selector(f"body[data-fs-drawn='0:{channels[-1]}']", timeout=10_000)
    after = page.evaluate("document.getElementById('fs-map-channel').toDataURL()")
    assert after != before

    # Curves: a click hides a run, a second shows it again.
    series = "g[data-fs-run='alexnet bs16']"
    page.click("button[data-fs-run='alexnet bs16']")
    assert page.eval_on_selector_all(series, "gs => gs.every(g => g.style.display === 'none')")
    page.click("button[data-fs-run='alexnet bs16']")
    assert page.eval_on_selector_all(series, "gs => gs.every(g => g.style.display === '')")

    # Projection: a point shows its neighbours.
    point = page.eval_on_selector("[data-fs-point]", "n => +n.dataset.fsPoint")
    page.click(f"[data-fs-point='{point}']")
    near = page.eval_on_selector_all(
        "#fs-point-neighbours [data-fs-neighbour]",
        "nodes => nodes.map(n => +n.dataset.fsNeighbour)",
    )
    vector = search.index.vectors[search.index.ids.tolist().index(point)][None]
    assert near == search.index.search(vector, 5, exclude_ids=[[point]]).ids[0].tolist()

    # Units: a stage's channels as tiles; a click shows the channel's top patches, whose
    # source images are top_activations' answer over the gallery.
    ids, images = gallery_images(search)
    top = top_activations(search.model, images, ["conv3"], k=3)["conv3"]
    page.select_option("#fs-unit-stage", "1")
    tiles = page.eval_on_selector_all("[data-fs-unit]", "nodes => nodes.map(n => n.dataset.fsUnit)")
    assert len(tiles) == top.values.shape[0] and tiles[0] == "conv3:0"
    page.click("[data-fs-unit='conv3:7']")
    page.wait_for_selector("body[data-fs-unit-drawn='conv3:7']", timeout=10_000)
    shown = page.eval_on_selector_all(
        "#fs-unit-examples [data-fs-unit-example]",
        "nodes => nodes.map(n => [n.dataset.fsUnitSource, n.querySelectorAll('img').length])",
    )
    where = search.image_paths()
    expected = [search.display_name(where[ids[i]]) for i in top.image_ids[7].tolist()]
    assert [name for name, _ in shown] == expected
    assert [count for _, count in shown] == [2, 2, 2]  # the patch and its source image
    overlay = page.evaluate(
        "(() => { const c = document.querySelector('#fs-unit-examples canvas');"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i]; return s; })()"
    )
    assert overlay > 0  # the channel's map drawn over its source image

    shot = tmp_path / "explorer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("FEATURESCOPE_SCREENSHOT"):  # the docs' picture: the page's first screen
        page.click(f"[data-fs-query='{query}']")
        page.click(f"[data-fs-channel='{channels[0]}']")
        page.wait_for_selector(f"body[data-fs-drawn='0:{channels[0]}']", timeout=10_000)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(
            path=os.environ["FEATURESCOPE_SCREENSHOT"],
            clip={"x": 0, "y": 0, "width": 1280, "height": 1250},
        )
    page.close()
    assert not problems, "\n".join(problems)


def test_the_page_of_a_users_folder_in_a_real_browser(browser, tmp_path):
    """File names, no study wording, no self-match, a trained head's Grad-CAM drawn."""
    from PIL import Image
    from skimage import data as images

    photos = tmp_path / "photos"
    (photos / "cats").mkdir(parents=True)
    (photos / "things").mkdir()
    for folder, name in (
        ("cats", "chelsea"),
        ("things", "coffee"),
        ("things", "rocket"),
        ("cats", "cat"),
        ("things", "astronaut"),
    ):
        picture = Image.fromarray(getattr(images, name)()).resize((80, 64))
        picture.save(photos / folder / f"{name}.webp")
    # Legal file names that break pages which escape too little, and one that is not UTF-8.
    hostile = [
        "<!--<script>.webp",
        "<img src=x onerror=window.__pwned=1>.webp",
        'it\'s "quoted"\nand \u2028 broken.webp',
        "\u202ebew.evil.webp",
    ]
    source = Image.fromarray(images.rocket()).resize((64, 48))
    for name in hostile:
        source.save(photos / "things" / name, format="WEBP")
    source.save(os.fsdecode(os.fsencode(str(photos / "things")) + b"/caf\xe9.webp"), format="WEBP")
    model = fs.create_model("alexnet_half", class_names=["cats", "things"])
    meta = fs.model_metadata(model)
    fs.zoo.attach_metadata(model, meta.replace(weights="checkpoint:0123"))  # a trained head
    search = fs.ImageSearch.build(model, photos, progress=False)
    where = search.image_paths()
    queries = [where[i] for i in sorted(where)]
    page_path = write_explorer(
        tmp_path / "photos.html",
        search,
        queries,
        query_labels=list(search.labels().values()),
        k=3,
    )
    problems: list[str] = []
    page = _open(browser, page_path, problems)
    assert page.evaluate("window.__pwned") is None  # no name ran as markup or script
    text = page.inner_text("body")
    listed = page.eval_on_selector_all("#fs-map-image option", "os => os.map(o => o.text)")
    names = {q["name"] for q in read_explorer_data(page_path)["queries"]}
    for name in [*hostile, "caf\udce9.webp"]:
        assert f"things/{name}" in names  # every name travels whole, byte for byte
    for name in hostile[:2]:
        assert any(f"things/{name} (things)" in option for option in listed)  # shown as text
    assert "training" not in text.lower() and "test image" not in text.lower()
    assert "chelsea.webp" in text and "Weights from a checkpoint" in text
    options = page.eval_on_selector_all("#fs-map-image option", "os => os.map(o => o.text)")
    assert options[0] == "1: cats/cat.webp (cats)"
    stage = page.eval_on_selector("#fs-stage option", "o => o.text")
    assert stage.startswith("stage 1 (27×27)") and "conv1" in stage
    for i, own in enumerate(sorted(where)):
        page.click(f"[data-fs-query='{i}']")
        shown = page.eval_on_selector_all(
            "#fs-search-results [data-fs-neighbour]",
            "nodes => nodes.map(n => +n.dataset.fsNeighbour)",
        )
        assert own not in shown and len(shown) == 3  # itself left out, the rest found
        captions = page.eval_on_selector_all(
            "#fs-search-results figcaption", "nodes => nodes.map(n => n.textContent)"
        )
        assert all(".webp" in c for c in captions)
        caption = page.inner_text("#fs-query-caption")
        name = Path(where[own]).name
        assert " ".join(name.split()) in " ".join(caption.split()) and "predicted" in caption
    cam = page.evaluate(
        "(() => { const c = document.getElementById('fs-gradcam');"
        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i]; return s; })()"
    )
    assert cam > 0  # the last query's Grad-CAM was drawn over its picture
    page.close()
    assert not problems, "\n".join(problems)


def test_a_units_page_in_a_real_browser(browser, tmp_path):
    """write_units_page's page alone: a stage's tiles, a click shows that channel's examples."""
    import torch

    from featurescope.pages import write_units_page

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 3, stride=2)
    ).eval()
    images = torch.rand(9, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    page_path = write_units_page(tmp_path / "units.html", model, images, ["1", "2"], k=4)
    top = top_activations(model, images, ["2"], k=4)["2"]
    problems: list[str] = []
    page = _open(browser, page_path, problems)
    page.select_option("#fs-unit-stage", "1")
    tiles = page.eval_on_selector_all("[data-fs-unit]", "nodes => nodes.map(n => n.dataset.fsUnit)")
    assert tiles == [f"2:{c}" for c in range(4)]
    page.click("[data-fs-unit='2:2']")
    page.wait_for_selector("body[data-fs-unit-drawn='2:2']", timeout=10_000)
    shown = page.eval_on_selector_all(
        "#fs-unit-examples [data-fs-unit-example]",
        "nodes => nodes.map(n => [n.dataset.fsUnitSource, n.querySelectorAll('img').length])",
    )
    assert shown == [[f"image {i}", 4] for i in top.image_ids[2].tolist()]  # both projections
    page.close()
    assert not problems, "\n".join(problems)
