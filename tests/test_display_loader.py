"""Every display shows an image file as the model decodes it (``load_rgb``), on odd real files.

The files are written here: a 16-bit PNG, an RGBA PNG with graded transparency, a JPEG whose
EXIF orientation (6) says to turn it upright, a grey PNG, a palette GIF, a CMYK TIFF, a WebP and
a BMP. Each display's drawn pixels are compared, array to array, with what the model reads:
``load_rgb`` (which the image folders use) and, for Grad-CAM, the preprocessed crop itself.
``load_rgb`` is first checked against the files' raw pixels, so "the same" is not "the same
mistake".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import featurescope as fs
from featurescope.data import ImageFolder, Preprocessing, as_rgb, load_rgb
from featurescope.study._experiments import preprocess_image
from featurescope.visualizers._common import to_display_image

H, W = 24, 40  # not square, so a turned image cannot pass for an upright one


def _pattern(channels: int = 3) -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    planes = [(x * 6 + y * 3) % 256, (y * 10) % 256, (x * y) % 256, (x + 2 * y) % 256]
    return np.stack(planes[:channels], axis=-1).astype(np.uint8)


def _write(folder, kind: str):
    path = (
        folder
        / {
            "png16": "deep.png",
            "rgba": "clear.png",
            "exif": "turned.jpg",
            "grey": "grey.png",
            "gif": "palette.gif",
            "cmyk": "print.tif",
            "webp": "photo.webp",
            "bmp": "old.bmp",
        }[kind]
    )
    rgb = Image.fromarray(_pattern())
    if kind == "png16":
        values = (np.mgrid[0:H, 0:W][1] * 1600 + 300).astype(np.uint16)  # up to 62,700
        Image.fromarray(values).save(path)
    elif kind == "rgba":
        Image.fromarray(_pattern(4), "RGBA").save(path)
    elif kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: turn 90° clockwise to show
        rgb.save(path, exif=exif.tobytes(), quality=95)
    elif kind == "grey":
        rgb.convert("L").save(path)
    elif kind == "gif":
        # Palette entry 0 transparent: those pixels show (and reach the model) as white.
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path, transparency=0)
    elif kind == "cmyk":
        Image.fromarray(_pattern(4), "CMYK").save(path)
    else:
        rgb.save(path)
    return path


KINDS = ("png16", "rgba", "exif", "grey", "gif", "cmyk", "webp", "bmp")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd")
    return {kind: _write(folder, kind) for kind in KINDS}


def _model_view(path) -> np.ndarray:
    return np.asarray(load_rgb(path), dtype=np.float64) / 255.0


def test_load_rgb_itself_decodes_the_odd_files_right(files):
    deep = np.asarray(Image.open(files["png16"]), dtype=np.float64)
    expected = np.repeat(np.rint(deep / 257.0)[..., None], 3, axis=-1)
    np.testing.assert_array_equal(np.asarray(load_rgb(files["png16"])), expected)
    assert expected.min() < 10 and expected.max() > 200  # not all white, as PIL's convert gives

    rgba = _pattern(4).astype(np.float64)
    alpha = rgba[..., 3:] / 255.0
    over_white = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
    got = np.asarray(load_rgb(files["rgba"]), dtype=np.float64)
    np.testing.assert_allclose(got, over_white, atol=1.0)

    with Image.open(files["exif"]) as raw:
        stored = np.asarray(raw.convert("RGB"))
    upright = np.asarray(load_rgb(files["exif"]))
    assert stored.shape == (H, W, 3) and upright.shape == (W, H, 3)
    np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))


@pytest.mark.parametrize("kind", KINDS)
def test_every_display_shows_the_model_input(files, kind, tmp_path):
    path = files[kind]
    model_view = _model_view(path)
    assert model_view.shape == ((W, H, 3) if kind == "exif" else (H, W, 3))

    # The folder the model reads (ImageFolder) decodes the same pixels.
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / path.name).write_bytes(path.read_bytes())
    decoded, _ = ImageFolder(tmp_path / "one", transform=lambda image: image)[0]
    np.testing.assert_array_equal(np.asarray(decoded, dtype=np.float64) / 255.0, model_view)

    # Paths and images fresh from Image.open, as any visualizer takes them.
    np.testing.assert_array_equal(to_display_image(path), model_view)
    with Image.open(path) as opened:
        np.testing.assert_array_equal(to_display_image(opened), model_view)

    # montage: the query and its neighbours, by path.
    result = (torch.tensor([[0.0, 1.0]]), torch.tensor([[0, 1]]))
    fig = fs.visualize("montage", result, images=[path, path], queries=[path])
    for ax in fig.axes:
        np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), model_view)

    # overlay: the image under the map.
    fig = fs.visualize("overlay", torch.rand(4, 3, 5), image=path)
    np.testing.assert_array_equal(np.asarray(fig.axes[0].images[0].get_array()), model_view)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("kind", KINDS)
def test_gradcam_draws_the_crop_the_model_was_given(files, kind):
    path = files[kind]
    prep = Preprocessing(resize=20, crop=16)
    model = _Tiny().eval()
    fig = fs.visualize("gradcam", path, model=model, preprocessing=prep)
    given = prep.transform()(load_rgb(path))
    drawn = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_allclose(drawn, prep.denormalize(given).permute(1, 2, 0).numpy(), atol=1e-6)
    with Image.open(path) as opened:
        again = fs.visualize("gradcam", opened, model=model, preprocessing=prep)
    np.testing.assert_array_equal(np.asarray(again.axes[0].images[0].get_array()), drawn)


def test_query_images_in_memory_reach_the_model_as_files_do(files):
    model = fs.create_model("squeezenet1_1")  # small; any zoo model brings its preprocessing
    for path in files.values():
        with Image.open(path) as opened:
            from_memory = preprocess_image(model, opened)
        torch.testing.assert_close(from_memory, preprocess_image(model, path), rtol=0, atol=0)


def test_as_rgb_of_a_decoded_image_changes_nothing(files):
    for path in files.values():
        decoded = load_rgb(path)
        np.testing.assert_array_equal(np.asarray(as_rgb(decoded)), np.asarray(decoded))
