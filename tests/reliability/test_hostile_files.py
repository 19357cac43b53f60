"""Hostile files and names in an image folder: each is read or skipped with its reason, nothing
hangs, nothing multiplies, and every name survives the trip to disk byte for byte."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import featurescope as fs
from featurescope.data import ImageFolder, SkippedFilesWarning

pytestmark = pytest.mark.slow

# Legal file names that have broken tools: markup, quotes, escapes, newlines, bidi marks.
HOSTILE_NAMES = [
    "<!--<script>.png",
    "\"quoted' & amp;.png",
    "esc\x1b[2J.png",
    "new\nline.png",
    "right\u202eto-left.png",
    "tab\there.png",
    " leading space.png",
]
NOT_UTF8 = [b"caf\xe9.png", b"\xff\xfe.png"]


def _png(color: tuple[int, int, int]) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return buffer.getvalue()


def _within(seconds: float, call: Any) -> Any:
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s: it hangs"
    assert out, "the call raised (see the thread's traceback above)"
    return out[0]


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, dict[bytes, bytes], list[socket.socket]]:
    """A folder of good images under hostile names, and every kind of trap beside them."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    good: dict[bytes, bytes] = {}  # file name (bytes) -> its PNG
    names = [os.fsencode(n) for n in HOSTILE_NAMES] + NOT_UTF8
    for i, name in enumerate(names):
        data = _png((20 * i, 255 - 20 * i, 7))
        raw = os.fsencode(root / "sub") + b"/" + name
        with open(raw, "wb") as fh:
            fh.write(data)
        good[raw] = data
    os.mkfifo(root / "pipe.jpg")
    (root / "zero.jpg").symlink_to("/dev/zero")  # a device: reading it never ends
    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "self").symlink_to(".")
    (root / "sub" / "up").symlink_to("..")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "sock.png"))
    return root, good, [server]


def test_a_hostile_folder_gives_exactly_its_images(hostile) -> None:
    root, good, _ = hostile
    with pytest.warns(SkippedFilesWarning) as record:
        ds = _within(60, lambda: ImageFolder(root, labels=False, transform=lambda im: im))
    assert sorted(os.fsencode(p) for p in ds.paths) == sorted(good)
    for i, path in enumerate(ds.paths):
        assert ds[i][0].tobytes() == Image.open(os.fsencode(path)).convert("RGB").tobytes()
    reasons = {Path(p).name: why for p, why in ds.skipped}
    assert reasons["pipe.jpg"] == "not a regular file: a named pipe (FIFO)"
    assert reasons["zero.jpg"] == "not a regular file: a character device"
    assert reasons["sock.png"] == "not a regular file: a socket"
    assert reasons["gone.png"].startswith("FileNotFoundError")
    assert "loop" in reasons["self"] and "loop" in reasons["up"]
    assert sorted(reasons) == ["gone.png", "pipe.jpg", "self", "sock.png", "up", "zero.jpg"]
    [warning] = record
    message = str(warning.message)
    assert message.isprintable() and "\n" not in message  # one inert line
    message.encode("utf-8")


def test_hostile_names_survive_an_extraction_to_disk_byte_for_byte(hostile, tmp_path) -> None:
    root, good, _ = hostile

    def tensor(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255

    with pytest.warns(SkippedFilesWarning):
        ds = ImageFolder(root, labels=False, transform=tensor)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4)).eval()
    tap = fs.FeatureTap(model, {"1": "out"})
    out = tmp_path / "features"
    first = tap.extract(ds, batch_size=3, out=out, progress=False)
    loaded = fs.tap.load_features(out)
    assert [os.fsencode(p) for p in loaded.paths] == [os.fsencode(p) for p in ds.paths]
    assert sorted(os.fsencode(p) for p in loaded.paths) == sorted(good)
    with torch.no_grad():
        expected = model(torch.stack([ds[i][0] for i in range(len(ds))]))
    np.testing.assert_allclose(loaded["out"], expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(first["out"], loaded["out"])
