"""Builtin visualizers on real AlexNet feature maps, and visualize/save at the package root."""

from __future__ import annotations

import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.figure import Figure
from PIL import Image, ImageOps
from torchvision.models.feature_extraction import create_feature_extractor

import featurescope as fs
from _plugin_module import plugin_module
from featurescope.visualizers import overlay as overlay_module

NODES = {"conv1.1": "conv1", "conv2.1": "conv2", "conv3.5": "conv5"}


# Every test starts from a newly built plugin manager and leaves none behind (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_plugins")


@pytest.fixture(scope="module")
def alexnet():
    torch.manual_seed(0)
    return fs.create_model("alexnet").eval()


@pytest.fixture(scope="module")
def transform():
    return fs.get_model_info("alexnet").preprocessing.transform()


@pytest.fixture(scope="module")
def cat():
    return Image.fromarray(skimage.data.chelsea())


@pytest.fixture(scope="module")
def tapped(alexnet, transform, cat):
    """Feature maps of the cat picture at three depths, ``{name: [C, H, W]}``, and the input."""
    x = transform(cat)[None]
    extractor = create_feature_extractor(alexnet, return_nodes=NODES)
    with torch.no_grad():
        maps = {name: out[0] for name, out in extractor(x).items()}
    return maps, x[0]


def png_pixels(fig: Figure, path: Path) -> np.ndarray:
    out = fs.save_figure(fig, path)
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)


def panel_array(ax) -> np.ndarray:
    return np.asarray(ax.images[0].get_array(), dtype=np.float64)


def per_channel_01(maps: torch.Tensor) -> torch.Tensor:
    m = maps.double()
    lo = m.amin(dim=(1, 2), keepdim=True)
    hi = m.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (m - lo) / torch.where(span > 0, span, 1), 0)


def test_tapped_maps_match_plain_module_calls(alexnet, tapped):
    maps, x = tapped
    with torch.no_grad():
        h1 = alexnet.conv1[:2](x[None])
        h2 = alexnet.conv2[:2](alexnet.conv1[2](h1))
        h5 = alexnet.conv3[:6](alexnet.conv2[2](h2))
    torch.testing.assert_close(maps["conv1"], h1[0])
    torch.testing.assert_close(maps["conv2"], h2[0])
    torch.testing.assert_close(maps["conv5"], h5[0])
    assert maps["conv1"].shape == (96, 55, 55)


# --- grid ---------------------------------------------------------------------------------------


def test_grid_shows_strongest_channels_first(tapped, tmp_path):
    maps = tapped[0]["conv1"]
    fig = fs.visualize("grid", maps, max_channels=16, title="conv1")
    assert len(fig.axes) == 16
    expected = torch.sort(maps.double().mean(dim=(1, 2)), descending=True, stable=True).indices
    assert [int(ax.get_title()) for ax in fig.axes] == expected[:16].tolist()
    reference = per_channel_01(maps)
    for ax, channel in zip(fig.axes, expected[:16].tolist(), strict=True):
        np.testing.assert_allclose(panel_array(ax), reference[channel].numpy(), atol=1e-6)
    assert fig.get_suptitle() == "conv1"
    assert png_pixels(fig, tmp_path / "grid.png").std() > 0


def test_grid_orders_and_cap(tapped):
    maps = tapped[0]["conv5"]
    by_l2 = fs.visualize("grid", maps, max_channels=9, order="l2")
    norms = maps.double().flatten(1).norm(dim=1)
    expected = torch.sort(norms, descending=True, stable=True).indices[:9].tolist()
    assert [int(ax.get_title()) for ax in by_l2.axes] == expected
    natural = fs.visualize("grid", maps, max_channels=5, order=None)
    assert [ax.get_title() for ax in natural.axes] == ["0", "1", "2", "3", "4"]


def test_grid_all_channels(tapped):
    maps = tapped[0]["conv1"]
    fig = fs.visualize("grid", maps, max_channels=None, ncols=12)
    assert len(fig.axes) == 96
    assert sorted(int(ax.get_title()) for ax in fig.axes) == list(range(96))


def test_grid_global_normalization_keeps_strengths_comparable(tapped):
    maps = tapped[0]["conv2"][:6]
    fig = fs.visualize("grid", maps, order=None, normalize="global")
    m = maps.double()
    reference = (m - m.min()) / (m.max() - m.min())
    for c, ax in enumerate(fig.axes):
        np.testing.assert_allclose(panel_array(ax), reference[c].numpy(), atol=1e-6)


@given(
    channels=st.integers(1, 7),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    cap=st.one_of(st.none(), st.integers(1, 9)),
    batched=st.booleans(),
)
def test_grid_panel_count(channels, height, width, cap, batched):
    maps = torch.randn(channels, height, width)
    # layout="chw": small random shapes such as [2, 2, 5] could also be read channels-last.
    fig = fs.visualize("grid", maps[None] if batched else maps, max_channels=cap, layout="chw")
    assert len(fig.axes) == min(channels, cap or channels)
    for ax in fig.axes:
        panel = panel_array(ax)
        assert panel.shape == (height, width)
        assert panel.min() >= 0 and panel.max() <= 1


def test_grid_rejects_what_it_cannot_draw():
    with pytest.raises(fs.InputShapeError, match=r"maps\[0\]"):
        fs.visualize("grid", torch.rand(2, 3, 4, 4))
    with pytest.raises(fs.VisualizationError, match="max_channels"):
        fs.visualize("grid", torch.rand(3, 4, 4), max_channels=0)
    with pytest.raises(fs.VisualizationError, match="order"):
        fs.visualize("grid", torch.rand(3, 4, 4), order="max")


# --- sum ----------------------------------------------------------------------------------------


def test_sum_is_the_channel_sum_with_a_colour_bar(tapped, tmp_path):
    maps = tapped[0]["conv2"]
    fig = fs.visualize("sum", maps[None])
    image_ax, colorbar_ax = fig.axes
    # The study's view: its [1, C, H, W] batch with channels summed away.
    reference = maps[None].double().sum(dim=1)[0]
    np.testing.assert_allclose(panel_array(image_ax), reference.numpy(), rtol=1e-5)
    low, high = colorbar_ax.get_ylim()
    assert low == pytest.approx(float(reference.min()), rel=1e-5)
    assert high == pytest.approx(float(reference.max()), rel=1e-5)
    assert image_ax.get_title() == "sum over 256 channels"
    assert png_pixels(fig, tmp_path / "sum.png").std() > 0
    assert len(fs.visualize("sum", maps, colorbar=False).axes) == 1


# --- overlay ------------------------------------------------------------------------------------


def bilinear_reference(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize in float64, written out by hand."""

    def taps(n_out: int, n_in: int):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, wy = taps(height, a.shape[0])
    x0, x1, wx = taps(width, a.shape[1])
    top = a[y0][:, x0] * (1 - wx) + a[y0][:, x1] * wx
    bottom = a[y1][:, x0] * (1 - wx) + a[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


@given(
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    height=st.integers(1, 30),
    width=st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_upsample_is_bilinear(h, w, height, width, seed):
    a = np.random.default_rng(seed).normal(size=(h, w))
    np.testing.assert_allclose(
        overlay_module.upsample(a, height, width), bilinear_reference(a, height, width), atol=1e-12
    )


def test_overlay_draws_the_upsampled_map_over_the_image(tapped, tmp_path):
    maps, x = tapped
    picture = fs.get_model_info("alexnet").preprocessing.denormalize(x)
    fig = fs.visualize("overlay", maps["conv5"], image=picture, alpha=0.4, title="conv5")
    (ax,) = fig.axes
    _, heat = ax.images
    np.testing.assert_allclose(
        panel_array(ax), picture.permute(1, 2, 0).double().numpy(), atol=1e-6
    )
    summed = maps["conv5"].double().sum(0).numpy()
    reference = bilinear_reference(summed, 227, 227)
    reference = (reference - reference.min()) / (reference.max() - reference.min())
    np.testing.assert_allclose(np.asarray(heat.get_array()), reference, atol=1e-6)
    assert heat.get_alpha() == pytest.approx(0.4)
    assert ax.get_title() == "conv5"
    assert png_pixels(fig, tmp_path / "overlay.png").std() > 0
    assert len(fs.visualize("overlay", maps["conv5"], image=picture, colorbar=True).axes) == 2


def test_overlay_accepts_pil_images_and_paths(tapped, cat, tmp_path):
    maps = tapped[0]["conv2"][0]  # a single [H, W] channel
    path = tmp_path / "cat.png"
    cat.save(path)
    expected = np.asarray(cat, dtype=np.float64) / 255
    for image in (cat, path, str(path), np.asarray(cat)):
        fig = fs.visualize("overlay", maps, image=image)
        np.testing.assert_allclose(panel_array(fig.axes[0]), expected, atol=1e-6)


def test_overlay_rejects_bad_options(tapped, tmp_path):
    maps = tapped[0]["conv5"]
    with pytest.raises(fs.VisualizationError, match="alpha"):
        fs.visualize("overlay", maps, image=torch.rand(3, 8, 8), alpha=1.5)
    with pytest.raises(fs.VisualizationError, match="cannot read"):
        fs.visualize("overlay", maps, image=tmp_path / "missing.png")
    with pytest.raises(fs.InputShapeError, match="image"):
        fs.visualize("overlay", maps, image=torch.rand(5, 8, 8))


# --- montage ------------------------------------------------------------------------------------

CLASSES = ["astronaut", "cat", "coffee", "rocket"]


@pytest.fixture(scope="module")
def gallery(alexnet, transform):
    """Two views of four pictures, their labels, and a float64 brute-force search result."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        picture = Image.fromarray(getattr(skimage.data, name)())
        images += [picture, ImageOps.mirror(picture)]
        labels += [label, label]
    batch = torch.stack([transform(im) for im in images])
    embed = create_feature_extractor(alexnet, return_nodes={"fc.4": "embedding"})
    with torch.no_grad():
        vectors = embed(batch)["embedding"].double()
    queries = [0, 2, 7]
    distances = torch.cdist(vectors[queries], vectors)
    d, i = torch.topk(distances, k=4, largest=False)
    return images, labels, queries, (d, i)


def test_montage_rows_of_query_and_neighbours(gallery, tmp_path):
    images, labels, queries, (d, i) = gallery
    fig = fs.visualize(
        "montage",
        (d, i),
        images=images,
        queries=queries,
        labels=labels,
        class_names=CLASSES,
        title="search by image",
    )
    assert len(fig.axes) == 3 * (1 + 4)
    titles = [ax.get_title() for ax in fig.axes]
    for row, query in enumerate(queries):
        assert titles[row * 5] == f"query\n{CLASSES[labels[query]]}"
        for j in range(4):
            ax = fig.axes[row * 5 + 1 + j]
            neighbour = int(i[row, j])
            assert (
                ax.get_title() == f"{j + 1}: {float(d[row, j]):.3g}\n{CLASSES[labels[neighbour]]}"
            )
            same = labels[neighbour] == labels[query]
            assert ax.title.get_color() == ("tab:green" if same else "tab:red")
            expected = np.asarray(images[neighbour], dtype=np.float64) / 255
            np.testing.assert_allclose(panel_array(ax), expected, atol=1e-6)
    assert png_pixels(fig, tmp_path / "montage.png").std() > 0


def test_montage_takes_paths_datasets_and_result_objects(gallery, tmp_path):
    images, labels, queries, (d, i) = gallery
    paths = []
    for n, image in enumerate(images):
        paths.append(tmp_path / f"{n}.png")
        image.save(paths[-1])
    from_paths = fs.visualize("montage", (d[0], i[0]), images=paths, queries=images[queries[0]])
    assert len(from_paths.axes) == 5
    np.testing.assert_allclose(
        panel_array(from_paths.axes[1]), np.asarray(images[int(i[0, 0])]) / 255, atol=1e-6
    )

    dataset = list(zip(images, labels, strict=True))  # torchvision-style (image, label) items
    result = types.SimpleNamespace(distances=d.numpy(), ids=i.numpy())
    fig = fs.visualize("montage", result, images=dataset, queries=queries)
    assert fig.axes[1].get_title().endswith(f"\n{labels[int(i[0, 0])]}")

    without_queries = fs.visualize("montage", (d, i), images=images)
    assert len(without_queries.axes) == 3 * 4


def test_montage_missing_neighbours_and_errors(gallery):
    images, _, _, (d, i) = gallery
    ids = i.clone()
    ids[0, -1] = -1  # FAISS's "fewer than k results"
    fig = fs.visualize("montage", (d, ids), images=images)
    assert fig.axes[3].get_title() == "no match"
    assert not fig.axes[3].images
    bad = i.clone()
    bad[1, 1] = len(images)
    with pytest.raises(fs.VisualizationError, match=f"id {len(images)}"):
        fs.visualize("montage", (d, bad), images=images)
    with pytest.raises(fs.InputShapeError, match="distances, ids"):
        fs.visualize("montage", d, images=images)
    with pytest.raises(fs.InputShapeError, match="3 queries but 2"):
        fs.visualize("montage", (d, i), images=images, queries=[0, 1])
    with pytest.raises(fs.InputShapeError, match=r"\[nq, k\]"):
        fs.visualize("montage", (d, i[:, :2]), images=images)


def test_montage_does_not_depend_on_the_index():
    source = Path(sys.modules["featurescope.visualizers.montage"].__file__).read_text()
    assert "featurescope.index" not in source
    assert "EmbeddingIndex(" not in source


# --- curves -------------------------------------------------------------------------------------

RUNS = {
    "alexnet bs8": {
        "train_loss": [1.6, 1.1, 0.7],
        "val_loss": [1.5, 1.2, 1.0],
        "train_acc": [0.3, 0.6, 0.8],
        "val_acc": [0.35, 0.5, 0.6],
    },
    "alexnet_half bs32": {"train_loss": [1.6, 1.3], "val_acc": [0.3, 0.4]},
}


def test_curves_two_panels_one_line_per_run_and_metric(tmp_path):
    fig = fs.visualize("curves", RUNS, title="width × batch size")
    loss_ax, acc_ax = fig.axes
    assert (loss_ax.get_ylabel(), acc_ax.get_ylabel()) == ("loss", "accuracy")
    plotted = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_color())
        for ax in fig.axes
        for line in ax.get_lines()
    }
    expected = {
        f"{run} {metric}": values
        for run, history in RUNS.items()
        for metric, values in history.items()
    }
    assert {k: v[1] for k, v in plotted.items()} == expected
    assert plotted["alexnet bs8 val_loss"][0] == [1, 2, 3]
    # One colour per run, whichever panel.
    assert plotted["alexnet bs8 train_loss"][2] == plotted["alexnet bs8 val_acc"][2]
    assert plotted["alexnet bs8 train_loss"][2] != plotted["alexnet_half bs32 train_loss"][2]
    assert [t.get_text() for t in acc_ax.get_legend().get_texts()] == [
        "alexnet bs8 train_acc",
        "alexnet bs8 val_acc",
        "alexnet_half bs32 val_acc",
    ]
    assert png_pixels(fig, tmp_path / "curves.png").std() > 0


def test_curves_accepts_per_epoch_records_and_one_history():
    records = [
        {"epoch": 2, "train_loss": 1.0, "val_acc": 0.5},
        {"epoch": 4, "train_loss": 0.5, "val_acc": 0.7},
    ]
    fig = fs.visualize("curves", {"run": records})
    (loss_line,) = fig.axes[0].get_lines()
    assert list(loss_line.get_xdata()) == [2, 4]
    assert list(loss_line.get_ydata()) == [1.0, 0.5]
    single = fs.visualize("curves", {"train_loss": [1.0, 0.5], "val_acc": [0.5, 0.7]})
    assert [line.get_label() for line in single.axes[0].get_lines()] == ["run train_loss"]


def test_curves_errors():
    with pytest.raises(fs.VisualizationError, match="lr"):
        fs.visualize("curves", {"run": {"lr": [0.1, 0.01]}})
    with pytest.raises(fs.InputShapeError, match="run name"):
        fs.visualize("curves", [1.0, 0.5])


# --- visualize and save -------------------------------------------------------------------------


def test_visualize_names_unknown_visualizers_and_options():
    with pytest.raises(fs.UnknownNameError, match="Did you mean: 'grid'"):
        fs.visualize("gird", torch.rand(2, 3, 3))
    with pytest.raises(fs.UnknownNameError, match="no option 'max_channel'.*'max_channels'"):
        fs.visualize("grid", torch.rand(2, 3, 3), max_channel=3)


def test_visualize_names_the_plugin_of_a_failing_visualizer():
    def broken(data):
        raise ValueError("cannot draw that")

    def not_a_figure(data):
        return "a string"

    plugin = plugin_module(
        featurescope_register_visualizers=lambda: {"broken": broken, "stringly": not_a_figure}
    )
    fs.register_plugin(plugin, "shaky-views")
    with pytest.raises(fs.PluginError, match="'broken'.*'shaky-views'.*cannot draw") as excinfo:
        fs.visualize("broken", None)
    assert isinstance(excinfo.value.__cause__, ValueError)
    with pytest.raises(fs.PluginError, match="'stringly'.*'shaky-views'.*str"):
        fs.visualize("stringly", None)


@pytest.mark.parametrize(
    ("suffix", "magic"), [(".png", b"\x89PNG"), (".svg", b"<svg"), (".PDF", b"%PDF")]
)
def test_save_picks_the_format_from_the_extension(tmp_path, suffix, magic):
    fig = fs.visualize("sum", torch.rand(3, 5, 5))
    out = fs.save_figure(fig, tmp_path / "nested" / f"figure{suffix}")
    assert out == tmp_path / "nested" / f"figure{suffix}"
    head = out.read_bytes()[:4096]
    assert magic in head
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_save_is_atomic(tmp_path, monkeypatch):
    fig = fs.visualize("sum", torch.rand(3, 5, 5))
    target = fs.save_figure(fig, tmp_path / "figure.png")
    before = target.read_bytes()

    def crash(path, **kwargs):
        Path(path).write_bytes(b"half a png")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        fs.save_figure(fig, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]
    with pytest.raises(fs.VisualizationError, match=r"\.png"):
        fs.save_figure(fig, tmp_path / "figure.jpg")


def test_visualizers_are_thread_safe(tapped):
    maps = tapped[0]["conv5"]
    jobs = [("sum", {}), ("grid", {"max_channels": 4}), ("sum", {"cmap": "magma"})] * 2

    def render(job) -> bytes:
        import io

        name, options = job
        buffer = io.BytesIO()
        fs.visualize(name, maps, **options).savefig(buffer, format="png")
        return buffer.getvalue()

    sequential = [render(job) for job in jobs]
    threaded: list[bytes | None] = [None] * len(jobs)

    def work(n: int) -> None:
        threaded[n] = render(jobs[n])

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert threaded == sequential


def test_drawing_never_touches_pyplot():
    package = Path(sys.modules["featurescope.visualizers"].__file__).parent
    for module in package.glob("*.py"):
        source = module.read_text()
        assert "matplotlib.pyplot" not in source, module.name
        assert "import pyplot" not in source, module.name
    if "matplotlib.pyplot" in sys.modules:
        pytest.skip("another test imported pyplot; the source check above still ran")
    fs.visualize("grid", torch.rand(3, 4, 4))
    fs.visualize("curves", {"r": {"train_loss": [1.0]}})
    assert "matplotlib.pyplot" not in sys.modules


# --- review fixes -------------------------------------------------------------------------------


def test_torch_and_numpy_uint8_images_are_divided_by_255():
    # A dim uint8 image: contrast stretching would brighten it, dividing by 255 must not.
    pixels = np.random.default_rng(0).integers(10, 60, size=(3, 9, 11), dtype=np.uint8)
    expected = np.moveaxis(pixels, 0, -1).astype(np.float64) / 255
    maps = torch.rand(2, 3, 3)
    for image in (pixels, torch.from_numpy(pixels)):
        fig = fs.visualize("overlay", maps, image=image)
        np.testing.assert_allclose(panel_array(fig.axes[0]), expected, atol=1e-12)


def test_missing_required_options_are_named():
    with pytest.raises(fs.VisualizationError, match="'images'"):
        fs.visualize("montage", (torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long)))
    with pytest.raises(fs.VisualizationError, match="'image'"):
        fs.visualize("overlay", torch.rand(2, 3, 3))


def test_curves_draws_train_history_objects():
    from featurescope.train import History

    history = History(
        train_loss=[1.2, 0.9], train_acc=[0.3, 0.5], val_loss=[1.1, 1.0],
        val_acc=[0.4, 0.6], lr=[0.01, 0.01], seconds=[3.0, 2.9],
    )  # fmt: skip
    for data in ({"run": history}, history):
        fig = fs.visualize("curves", data)
        lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[1].get_lines()}
        assert lines == {"run train_acc": [0.3, 0.5], "run val_acc": [0.4, 0.6]}


# --- token and channels-last maps -----------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_tokens():
    """A ViT-B/16 block's output on a 64-pixel image: ``[1, 1 + 4*4, 768]``, and the image."""
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.get_model("vit_b_16", weights=None, image_size=64).eval()
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = fs.FeatureTap(vit, ["encoder.layers.encoder_layer_3.ln_1"])(image)
    return out["encoder.layers.encoder_layer_3.ln_1"], image[0], vit


def _token_reference(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[1, prefix + h*w, C]`` -> ``[C, h, w]``: class tokens dropped, patches row by row."""
    patches = tokens[0, tokens.shape[1] - h * w :]
    return patches.reshape(h, w, -1).permute(2, 0, 1).double()


def test_grid_draws_vit_tokens_on_the_patch_grid(vit_tokens):
    tokens, _, vit = vit_tokens
    assert tokens.shape == (1, 17, 768)
    reference = per_channel_01(_token_reference(tokens, 4, 4))
    for kwargs in ({}, {"image_size": vit.image_size, "patch_size": vit.patch_size}):
        fig = fs.visualize("grid", tokens, max_channels=6, order=None, **kwargs)
        assert [ax.get_title() for ax in fig.axes] == ["0", "1", "2", "3", "4", "5"]
        for channel, ax in enumerate(fig.axes):
            np.testing.assert_allclose(panel_array(ax), reference[channel].numpy(), atol=1e-6)
    # One sample without its batch dimension reads the same.
    fig = fs.visualize("grid", tokens[0], max_channels=1, order=None)
    np.testing.assert_allclose(panel_array(fig.axes[0]), reference[0].numpy(), atol=1e-6)


def test_sum_and_overlay_draw_vit_tokens(vit_tokens):
    tokens, image, _ = vit_tokens
    reference = _token_reference(tokens, 4, 4).sum(0)
    fig = fs.visualize("sum", tokens)
    np.testing.assert_allclose(panel_array(fig.axes[0]), reference.numpy(), rtol=1e-6)
    fig = fs.visualize("overlay", tokens, image=image)
    heat = torch.nn.functional.interpolate(
        reference[None, None], size=(64, 64), mode="bilinear", align_corners=False
    )[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min())
    np.testing.assert_allclose(fig.axes[0].images[1].get_array(), heat.numpy(), atol=1e-6)


def test_grid_draws_swin_channels_last_maps():
    import torchvision

    swin = torchvision.models.get_model("swin_t", weights=None).eval()
    with torch.no_grad():
        out = fs.FeatureTap(swin, ["features.1"])(torch.rand(1, 3, 64, 64))["features.1"]
    assert out.shape == (1, 16, 16, 96)  # [N, H, W, C]
    reference = per_channel_01(out[0].permute(2, 0, 1))
    fig = fs.visualize("grid", out, max_channels=3, order=None)
    for channel, ax in enumerate(fig.axes):
        assert panel_array(ax).shape == (16, 16)
        np.testing.assert_allclose(panel_array(ax), reference[channel].numpy(), atol=1e-6)
    summed = fs.visualize("sum", out[0])
    np.testing.assert_allclose(panel_array(summed.axes[0]), out[0].double().sum(-1).numpy())


def test_tokens_on_a_non_square_patch_grid_from_image_and_patch_size():
    tokens = torch.randn(1, 1 + 2 * 6, 5)  # a class token, then a 2x6 grid of patches
    maps = fs.visualizers.as_maps(tokens, image_size=(32, 96), patch_size=16)
    torch.testing.assert_close(torch.from_numpy(maps), _token_reference(tokens, 2, 6))
    fig = fs.visualize("sum", tokens, image_size=(32, 96), patch_size=16)
    assert panel_array(fig.axes[0]).shape == (2, 6)


def test_layout_override():
    data = torch.randn(4, 4, 9)
    auto = fs.visualize("grid", data, max_channels=None, order=None)
    assert len(auto.axes) == 9  # read channels-last: 9 channels of 4x4
    np.testing.assert_allclose(panel_array(auto.axes[2]), per_channel_01(data.permute(2, 0, 1))[2])
    chw = fs.visualize("grid", data, max_channels=None, order=None, layout="chw")
    assert len(chw.axes) == 4 and panel_array(chw.axes[0]).shape == (4, 9)
    tokens = torch.randn(10, 3)  # a class token and a 3x3 grid, said explicitly
    fig = fs.visualize("sum", tokens, layout="tokens")
    np.testing.assert_allclose(panel_array(fig.axes[0]), tokens[1:].double().sum(1).reshape(3, 3))


def test_no_layout_fits_is_a_clear_error():
    with pytest.raises(fs.InputShapeError, match=r"\[1, 51, 8\].*51 tokens"):
        fs.visualize("grid", torch.randn(1, 51, 8), layout="tokens")
    with pytest.raises(fs.InputShapeError, match=r"\[1, 17, 8\].*3×3 patch grid"):
        fs.visualize("sum", torch.randn(1, 17, 8), layout="tokens", image_size=48, patch_size=16)
    with pytest.raises(fs.InputShapeError, match=r"\[2, 3, 4, 5, 6\] fits no layout"):
        fs.visualize("grid", torch.randn(2, 3, 4, 5, 6))
    with pytest.raises(fs.InputShapeError, match=r"\[4, 17, 8\].*batch of 4"):
        fs.visualize("grid", torch.randn(4, 17, 8), layout="tokens")
    with pytest.raises(fs.VisualizationError, match="layout must be one of"):
        fs.visualize("grid", torch.randn(3, 4, 4), layout="nhwc")
    with pytest.raises(fs.VisualizationError, match="go together"):
        fs.visualize("grid", torch.randn(1, 17, 8), image_size=64)


_LONG = "Grad-CAM: a class with a long name (features.7.2.block.5.stochastic_depth_long_node)"


@pytest.mark.parametrize("name", ["grid", "sum", "overlay", "montage", "curves"])
@pytest.mark.parametrize("dpi", [72, 150])
def test_long_titles_are_drawn_whole_inside_the_figure(name, dpi):
    """A title wider than its figure is wrapped, never cut at the figure's edge."""
    import re

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    maps = torch.rand(4, 5, 5)
    data, options = {
        "grid": (maps, {"panel_size": 0.6}),
        "sum": (maps, {"size": 2.0}),
        "overlay": (maps, {"image": torch.rand(3, 40, 20), "size": 2.4}),
        "montage": (
            (torch.tensor([[0.1, 0.2]]), torch.tensor([[0, 1]])),
            {"images": torch.rand(2, 3, 8, 8), "panel_size": 1.0},
        ),
        "curves": ({"run": {"loss": [1.0, 0.5], "acc": [0.2, 0.6]}}, {"size": 1.5}),
    }[name]
    fig = fs.visualize(name, data, title=_LONG, **options)
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    texts = [t for t in (fig._suptitle, *(ax.title for ax in fig.axes)) if t and t.get_text()]
    title = next(t for t in texts if "Grad" in t.get_text())
    assert re.sub(r"\s", "", title.get_text()) == re.sub(r"\s", "", _LONG)
    assert "\n" in title.get_text()  # it did need wrapping
    box = title.get_window_extent(canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, (box, fig.bbox)
    for ax in fig.axes:  # and it is above every axes, not over them
        assert box.y0 >= ax.get_window_extent().y1 - 1
