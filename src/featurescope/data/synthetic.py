"""The bundled dataset: five shape classes drawn procedurally, written to disk as an image folder.

Nothing is downloaded. Every image is drawn from its own seed (the dataset seed, its split, class
and index), so the files are identical on every run, and changing how many images a split has
leaves the others untouched. Classes differ by shape; each also leans to a hue of its own, as
the study's Pokémon do, with hues that overlap between neighbouring classes. Size, rotation,
position, outline or fill, background, clutter and noise vary at random, so a network has to
learn shapes to be right on the hard cases, and the nearest neighbours of a query are visibly
of its kind.

The folder has the study's layout, ``root/{train,val,test}/<class>/<n>.png``, plus a small
manifest (``synthetic.json``) that records the parameters and a hash of every file, so a second
call reuses a complete copy instead of drawing it again.
"""

from __future__ import annotations

import colorsys
import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from featurescope._io import atomic_open
from featurescope.errors import FeaturescopeError

__all__ = [
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_VERSION",
    "default_data_dir",
    "make_synthetic_dataset",
    "synthetic_image",
]

#: Bump when the drawing changes, so cached copies of an older version are not reused.
SYNTHETIC_VERSION = 1
#: The five classes, in the (sorted) order an image folder gives them.
SYNTHETIC_CLASSES: tuple[str, ...] = ("circle", "cross", "square", "star", "triangle")

MANIFEST = "synthetic.json"
_FORMAT = "featurescope-synthetic"
_SPLITS = ("train", "val", "test")
_DEFAULTS: dict[str, int] = {
    "train_per_class": 40,
    "val_per_class": 10,
    "test_per_class": 5,
    "size": 128,
    "seed": 0,
}
# How varied the images are. Tuned so that both AlexNets learn the shapes within a couple of
# CPU minutes while neither is perfect on validation: see the QUICK preset.
_RADIUS = (0.17, 0.3)  # of the side
_FILL_PROBABILITY = 0.7  # else an outline
_CLUTTER = (2, 9)  # distractors per image, [low, high)
_NOISE_SIGMA = (3.0, 14.0)  # on 0-255 pixel values
# Like the study's Pokémon, each class leans to a hue of its own (class k: hue k/5), with a
# spread that overlaps its neighbours', so colour helps a network start learning within the
# few steps of the quick preset, and shape must settle the rest. None: any colour at all.
_HUE_SPREAD: float | None = 0.07
_BACKGROUND_SATURATION = 0.25  # 0: grey backgrounds, 1: any colour
# Shapes are drawn this many times larger and downsampled: ImageDraw does not antialias.
_SUPERSAMPLE = 2

Point = tuple[float, float]


def default_data_dir() -> Path:
    """Where featurescope keeps generated data: ``$FEATURESCOPE_DATA``, else the user's cache.

    The cache is ``$XDG_CACHE_HOME/featurescope`` or ``~/.cache/featurescope``.

    Example:
        >>> import os
        >>> os.environ["FEATURESCOPE_DATA"] = "/tmp/fs-data"
        >>> str(default_data_dir())
        '/tmp/fs-data'
        >>> del os.environ["FEATURESCOPE_DATA"]
    """
    env = os.environ.get("FEATURESCOPE_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "featurescope"


def _rotated(points: list[Point], angle: float, center: Point) -> list[Point]:
    c, s = math.cos(angle), math.sin(angle)
    cx, cy = center
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _shape_outline(name: str, radius: float, rng: np.random.Generator) -> list[Point]:
    """The shape's polygon around the origin, or ``[]`` for the circle (drawn as an ellipse)."""
    r = radius
    if name == "square":
        return [(-r, -r), (r, -r), (r, r), (-r, r)]
    if name == "triangle":
        angles = [-math.pi / 2 + k * 2 * math.pi / 3 + rng.uniform(-0.15, 0.15) for k in range(3)]
        return [(1.15 * r * math.cos(a), 1.15 * r * math.sin(a)) for a in angles]
    if name == "star":
        inner = rng.uniform(0.38, 0.5)
        return [
            (
                (r if k % 2 == 0 else r * inner) * 1.1 * math.cos(-math.pi / 2 + k * math.pi / 5),
                (r if k % 2 == 0 else r * inner) * 1.1 * math.sin(-math.pi / 2 + k * math.pi / 5),
            )
            for k in range(10)
        ]
    if name == "cross":
        t = r * rng.uniform(0.28, 0.4)
        return [
            (-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t),
            (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t),
        ]  # fmt: skip
    return []


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def _contrasting(rng: np.random.Generator, against: np.ndarray) -> tuple[int, int, int]:
    """A random colour far enough from ``against`` (RGB) to be seen, however noisy the image."""
    for _ in range(50):
        colour = _colour(rng)
        if np.abs(np.asarray(colour, dtype=float) - against).sum() > 180:
            return colour
    return tuple(int(v) for v in 255 - against)  # type: ignore[return-value]


def _class_colour(
    rng: np.random.Generator, class_index: int, spread: float
) -> tuple[int, int, int]:
    """A colour whose hue leans to the class's own, overlapping its neighbours' hues."""
    hue = (class_index / len(SYNTHETIC_CLASSES) + rng.normal(0.0, spread)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.55, 1.0))
    return tuple(int(255 * v) for v in rgb)  # type: ignore[return-value]


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """A ``[n, n, 3]`` float image: a linear gradient between two random colours."""
    grey = rng.uniform(0, 255, size=2)
    a = (1 - _BACKGROUND_SATURATION) * grey[0] + _BACKGROUND_SATURATION * rng.uniform(0, 255, 3)
    b = (1 - _BACKGROUND_SATURATION) * grey[1] + _BACKGROUND_SATURATION * rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1.0, 1.0, n)
    t = (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]) * 0.5 + 0.5
    return a + (b - a) * t[..., None]  # type: ignore[no-any-return]


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, n: int) -> None:
    """Lines, arcs and small dots: distractors smaller and thinner than any class shape."""
    for _ in range(int(rng.integers(*_CLUTTER))):
        kind = rng.integers(0, 3)
        colour = _colour(rng)
        x, y = rng.uniform(0, n, size=2)
        if kind == 0:
            length, angle = rng.uniform(0.1, 0.45) * n, rng.uniform(0, math.pi)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line([(x, y), end], fill=colour, width=int(rng.integers(1, 4)) * _SUPERSAMPLE)
        elif kind == 1:
            r = rng.uniform(0.04, 0.12) * n
            start = rng.uniform(0, 360)
            draw.arc(
                [x - r, y - r, x + r, y + r],
                start,
                start + rng.uniform(60, 200),
                fill=colour,
                width=2 * _SUPERSAMPLE,
            )
        else:
            r = rng.uniform(0.01, 0.03) * n
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def synthetic_image(shape: str, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """Draw one ``size``×``size`` RGB image of ``shape`` (one of :data:`SYNTHETIC_CLASSES`).

    Args:
        shape: the class to draw.
        rng: the source of every random choice; the same state draws the same image.
        size: side of the square image in pixels.

    Returns:
        A PIL RGB image.

    Raises:
        FeaturescopeError: ``shape`` is not one of :data:`SYNTHETIC_CLASSES`.

    Example:
        >>> import numpy as np
        >>> img = synthetic_image("star", np.random.default_rng(0), size=64)
        >>> img.size, img.mode
        ((64, 64), 'RGB')
    """
    if shape not in SYNTHETIC_CLASSES:
        raise FeaturescopeError(
            f"unknown synthetic shape {shape!r}; choose from {SYNTHETIC_CLASSES}"
        )
    n = size * _SUPERSAMPLE
    background = _background(rng, n)
    canvas = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    _clutter(draw, rng, n)

    radius = rng.uniform(*_RADIUS) * n
    # Keep the shape inside the study's centre crop (227 of 256, i.e. ~89% of the side).
    margin = radius * 1.1 + 0.06 * n
    center = (float(rng.uniform(margin, n - margin)), float(rng.uniform(margin, n - margin)))
    local = background[int(center[1]), int(center[0])]
    if _HUE_SPREAD is None:
        colour = _contrasting(rng, local)
    else:
        colour = _class_colour(rng, SYNTHETIC_CLASSES.index(shape), _HUE_SPREAD)
    filled = rng.uniform() < _FILL_PROBABILITY
    stroke = max(2, int(radius * rng.uniform(0.12, 0.22)))
    outline = _shape_outline(shape, radius, rng)
    if outline:
        poly = _rotated(outline, float(rng.uniform(0, 2 * math.pi)), center)
        if filled:
            draw.polygon(poly, fill=colour)
        else:
            draw.line([*poly, poly[0]], fill=colour, width=stroke, joint="curve")
    else:
        aspect = rng.uniform(0.85, 1.0)
        box = [
            center[0] - radius,
            center[1] - radius * aspect,
            center[0] + radius,
            center[1] + radius * aspect,
        ]
        if filled:
            draw.ellipse(box, fill=colour)
        else:
            draw.ellipse(box, outline=colour, width=stroke)

    small = canvas.resize((size, size), Image.Resampling.BOX)
    sigma = rng.uniform(*_NOISE_SIGMA)
    noisy = np.asarray(small, dtype=np.float32) + rng.normal(0.0, sigma, size=(size, size, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def _params(**given: int) -> dict[str, int]:
    params = {**_DEFAULTS, **given}
    for key, value in params.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise FeaturescopeError(f"{key} must be an int, got {value!r}")
        if value < 0 or (key == "size" and value < 8):
            raise FeaturescopeError(
                f"{key} must be {'>= 8' if key == 'size' else '>= 0'}, got {value}"
            )
    if params["train_per_class"] < 1:
        raise FeaturescopeError("train_per_class must be at least 1")
    return params


def _default_root(params: dict[str, int]) -> Path:
    name = f"synthetic-v{SYNTHETIC_VERSION}"
    if params != _DEFAULTS:
        key = json.dumps(params, sort_keys=True).encode()
        name += "-" + hashlib.sha256(key).hexdigest()[:10]
    return default_data_dir() / name


def _files(root: Path) -> Iterator[Path]:
    for split in _SPLITS:
        if (root / split).is_dir():
            yield from sorted((root / split).rglob("*.png"))


def _digest(root: Path) -> tuple[int, str]:
    """The number of images under ``root`` and one SHA-256 over their relative paths and bytes."""
    h = hashlib.sha256()
    count = 0
    for path in _files(root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
        count += 1
    return count, h.hexdigest()


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == _FORMAT else None


def _is_complete(root: Path, params: dict[str, int]) -> bool:
    manifest = _read_manifest(root)
    if manifest is None:
        return False
    if manifest.get("version") != SYNTHETIC_VERSION or manifest.get("params") != params:
        return False
    count, digest = _digest(root)
    return count == manifest.get("images") and digest == manifest.get("sha256")


def _draw_all(
    tmp: Path, params: dict[str, int], on_image: Callable[[], None] | None = None
) -> None:
    for split_index, split in enumerate(_SPLITS):
        count = params[f"{split}_per_class"]
        if count == 0:
            continue  # an empty split folder would fail to load; leave it out
        for class_index, name in enumerate(SYNTHETIC_CLASSES):
            folder = tmp / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([params["seed"], split_index, class_index, i])
                image = synthetic_image(name, rng, params["size"])
                image.save(folder / f"{name}_{i:04d}.png", compress_level=1)
                if on_image is not None:
                    on_image()


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[], None] | None]:
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="drawing synthetic dataset", unit="img") as bar:
        yield lambda: bar.update(1)


def make_synthetic_dataset(
    root: str | os.PathLike[str] | None = None,
    *,
    train_per_class: int = _DEFAULTS["train_per_class"],
    val_per_class: int = _DEFAULTS["val_per_class"],
    test_per_class: int = _DEFAULTS["test_per_class"],
    size: int = _DEFAULTS["size"],
    seed: int = _DEFAULTS["seed"],
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Write (or reuse) the bundled five-class shape dataset and return its root.

    The result has the study's layout, ``root/train``, ``root/val`` and ``root/test``, each with
    one folder per class of :data:`SYNTHETIC_CLASSES`, and loads with
    :func:`~featurescope.data.load_image_folders`. A complete copy made with the same
    parameters is reused (its manifest's hash is checked); otherwise the images are drawn into a
    temporary folder beside ``root`` and moved into place only when complete, so an interrupted
    run never leaves a half-written dataset that looks finished.

    Args:
        root: where to write. Default: ``default_data_dir() / "synthetic-v1"`` for the default
            parameters, a name with a hash of the parameters otherwise.
        train_per_class: training images per class.
        val_per_class: validation images per class (0 for none).
        test_per_class: test images per class (0 for none).
        size: side of the square images, in pixels. The study's preprocessing resizes them to
            256 and centre-crops 227, so small images cost little and lose nothing that matters.
        seed: the dataset seed; each image is drawn from ``(seed, split, class, index)``.
        force: draw again even if a complete copy exists.
        progress: show a tqdm progress bar while drawing.

    Returns:
        The dataset's root folder.

    Raises:
        FeaturescopeError: a bad parameter, or ``root`` is a non-empty folder that is not a
            featurescope synthetic dataset (it is never overwritten).

    Example:
        >>> import tempfile
        >>> root = make_synthetic_dataset(tempfile.mkdtemp() + "/shapes", train_per_class=2,
        ...                               val_per_class=1, test_per_class=0, size=32)
        >>> sorted(p.name for p in (root / "train").iterdir())
        ['circle', 'cross', 'square', 'star', 'triangle']
        >>> make_synthetic_dataset(root, train_per_class=2, val_per_class=1, test_per_class=0,
        ...                        size=32) == root  # reused, not drawn again
        True
    """
    params = _params(
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        test_per_class=test_per_class,
        size=size,
        seed=seed,
    )
    target = Path(root).expanduser() if root is not None else _default_root(params)
    if not force and _is_complete(target, params):
        return target
    if target.exists() and not (target.is_dir() and _may_replace(target)):
        raise FeaturescopeError(
            f"{target} exists and is not a featurescope synthetic dataset; refusing to overwrite "
            "it. Pass another root, or remove it first."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        total = len(SYNTHETIC_CLASSES) * sum(params[f"{s}_per_class"] for s in _SPLITS)
        with _progress(total, progress) as tick:
            _draw_all(tmp, params, tick)
        count, digest = _digest(tmp)
        manifest = {
            "format": _FORMAT,
            "version": SYNTHETIC_VERSION,
            "params": params,
            "classes": list(SYNTHETIC_CLASSES),
            "images": count,
            "sha256": digest,
        }
        with atomic_open(tmp / MANIFEST) as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True)
        _move_into_place(tmp, target, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _may_replace(folder: Path) -> bool:
    """Only an empty folder or an older/other copy of ours may be replaced."""
    return _read_manifest(folder) is not None or not any(folder.iterdir())


def _move_into_place(tmp: Path, target: Path, params: dict[str, int]) -> None:
    if target.exists():
        # Move the old copy aside first: a rename is atomic, deleting a tree is not.
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.replace(target, old / "data")
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        # Another process finished the same dataset first; its copy is as good as ours.
        if not _is_complete(target, params):
            raise
