"""How long the explorer page of a folder of real photos takes to write, and what it weighs.

Makes ~30 varied photos from scikit-image's bundled images (crops and resizes in JPEG, PNG,
WebP, BMP, TIFF and GIF; grey, 16-bit, transparent and EXIF-rotated ones, in nested folders),
indexes them with a zoo model (random weights unless --weights names cached ones), and times
``explore_index`` on them: seconds and megabytes, with the processor and the load.

    python benchmarks/bench_explorer.py --out /tmp/fs-bench [--model resnet18] [--queries 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

NAMES = ("chelsea", "astronaut", "coffee", "rocket", "camera", "coins", "horse", "moon",
         "page", "text", "clock", "immunohistochemistry", "hubble_deep_field", "retina",
         "colorwheel")  # fmt: skip


def make_photos(root: Path, count: int = 30) -> list[Path]:
    """``count`` image files of several formats and modes under ``root`` (nested)."""
    from PIL import Image
    from skimage import data

    root.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    formats = ("jpg", "png", "webp", "bmp", "tiff", "gif")
    for i in range(count):
        name = NAMES[i % len(NAMES)]
        array = np.asarray(getattr(data, name)())
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        if array.ndim == 3 and array.shape[2] == 4:
            array = array[..., :3]
        h, w = array.shape[:2]
        # A different crop for each repeat: the first pass whole, later ones a quarter.
        if i >= len(NAMES):
            y, x = (i * 37) % max(1, h // 2), (i * 53) % max(1, w // 2)
            array = array[y : y + h // 2, x : x + w // 2]
        picture = Image.fromarray(array)
        picture = picture.resize(
            (max(16, picture.width * 3 // 4), max(16, picture.height * 3 // 4))
        )
        folder = root / ("nested" if i % 5 == 4 else "")
        folder.mkdir(exist_ok=True)
        kind = i % 9
        if kind == 6:  # 16-bit grey
            grey = np.asarray(picture.convert("L"), dtype=np.uint16) * 257
            path = folder / f"{i:02d}_{name}_16bit.png"
            Image.fromarray(grey).save(path)
        elif kind == 7:  # transparent
            rgba = picture.convert("RGBA")
            rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
            path = folder / f"{i:02d}_{name}_alpha.png"
            rgba.save(path)
        elif kind == 8:  # EXIF-rotated JPEG
            exif = Image.Exif()
            exif[0x0112] = 6
            path = folder / f"{i:02d}_{name}_rotated.jpg"
            picture.convert("RGB").save(path, exif=exif)
        else:
            ext = formats[kind % len(formats)]
            path = folder / f"{i:02d}_{name}.{ext}"
            (picture.convert("RGB") if ext in ("jpg", "bmp") else picture).save(path)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/fs-bench-explorer")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument(
        "--as-trained",
        action="store_true",
        help="mark the random head as trained (class names, a checkpoint tag) so that the page "
        "also carries predictions and Grad-CAM: the full cost of a trained model's page",
    )
    args = parser.parse_args()

    import torch

    import featurescope as fs
    from featurescope.study.explorer import write_explorer

    out = Path(args.out)
    photos = out / "photos"
    if not photos.is_dir():
        make_photos(photos, args.queries)
    index = out / "photos.fsindex"
    t = time.perf_counter()
    if not index.is_dir():  # built once: this measures the page
        search = fs.ImageSearch.build(fs.create_model(args.model).eval(), photos, progress=False)
        search.save(index)
    built = time.perf_counter() - t
    t = time.perf_counter()
    search = fs.ImageSearch.load(index)
    loaded = time.perf_counter() - t
    if args.as_trained:
        meta = fs.model_metadata(search.model)
        names = [f"class {i}" for i in range(meta.num_classes)]
        fs.zoo.attach_metadata(
            search.model, meta.replace(weights="checkpoint:x", class_names=names)
        )
    paths = [p for p in search.index.metadata if p][: args.queries]
    t = time.perf_counter()
    page = write_explorer(out / "explorer.html", search, paths)
    seconds = time.perf_counter() - t
    flags = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                flags = line.split(":", 1)[1].strip()
                break
    print(
        f"{len(paths)} photos, {args.model}{' (as trained)' if args.as_trained else ''}: "
        f"index build {built:.1f} s, load {loaded:.1f} s; write_explorer "
        f"{seconds:.1f} s, {page.stat().st_size / 1e6:.2f} MB\n"
        f"processor: {flags or platform.processor()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()}"
    )


if __name__ == "__main__":
    main()
