"""Image folders: ``root/<class>/<image>`` datasets, any folder of images, and ``root/{train,val,test}``.

:class:`ImageFolder` reads the same layout as torchvision's and exposes the same ``samples``,
``targets``, ``classes`` and ``class_to_idx``, so code written for torchvision keeps working and
:meth:`featurescope.FeatureTap.extract` finds each image's label and path. It also takes a folder
of images with no classes (flat or nested, read recursively; every label is ``-1``). Unlike
torchvision's, it checks every image once when the folder is opened and skips the files it
cannot read (not images, or not decodable), counted and listed in one warning and in
``.skipped``, instead of crashing mid-epoch; and a missing or empty folder is an error that says
what was expected. Images are read as a viewer shows them: EXIF orientation applied, grey,
palette, transparent and 16-bit images converted to 8-bit RGB.
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from featurescope._printable import printable
from featurescope.errors import EmptyDatasetError, FeaturescopeError, FeaturescopeWarning

__all__ = [
    "IMAGE_EXTENSIONS",
    "NO_LABEL",
    "DatasetSplits",
    "EmptyDatasetError",
    "ImageFolder",
    "SkippedFilesWarning",
    "as_rgb",
    "load_image_folders",
    "load_rgb",
]

#: The label of every image of a folder without classes.
NO_LABEL = -1
# How many skipped files the warning names; all of them are in ``.skipped``.
_LISTED = 20


class SkippedFilesWarning(FeaturescopeWarning):
    """Some files of an image folder were left out: not images, not decodable, not regular
    files (a named pipe, a socket, a device), or folders a symbolic link loops back to.

    Example:
        >>> issubclass(SkippedFilesWarning, FeaturescopeWarning)
        True
    """


#: File extensions (lower case) treated as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif",
)  # fmt: skip

PathLike = str | os.PathLike[str]
Transform = Callable[[Image.Image], Any]


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as a viewer shows ``img``: 16-bit scaled (not clipped), transparency on white."""
    import numpy as np

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # PIL's own convert clips 16-bit values at 255: scale 0..65535 to 0..255 instead.
        values = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: PathLike) -> Image.Image:
    """Open an image file as 8-bit RGB, decoding it fully (so a truncated file fails here).

    The EXIF orientation is applied (a phone's portrait photo stands upright); grey, palette,
    CMYK and 16-bit images are converted (16-bit values scaled to 8 bits, not clipped), and
    transparent ones are composited over white.

    Example:
        >>> import tempfile, numpy as np
        >>> from PIL import Image
        >>> path = tempfile.mkdtemp() + "/deep.png"
        >>> Image.fromarray(np.full((2, 3), 65535, np.uint16)).save(path)  # 16-bit white
        >>> image = load_rgb(path)
        >>> image.mode, image.size, image.getpixel((0, 0))
        ('RGB', (3, 2), (255, 255, 255))
    """
    from PIL import ImageOps

    os.stat(path)  # a missing file raises FileNotFoundError, as Image.open would
    not_regular = _not_regular(path)
    if not_regular is not None:
        raise _NotRegularFileError(f"cannot read image {printable(os.fspath(path))}: {not_regular}")
    with Image.open(path) as img:
        img.load()
        upright = ImageOps.exif_transpose(img)
        rgb: Image.Image = _to_rgb(upright if upright is not None else img)
    return rgb


def as_rgb(image: Image.Image) -> Image.Image:
    """An image in memory as 8-bit RGB, converted as :func:`load_rgb` converts a file's.

    Every display (montages, overlays, Grad-CAM) converts the images it is given with it, and
    reads files with :func:`load_rgb`, so what is shown is what the model saw. The EXIF
    orientation is applied (an image fresh from ``Image.open`` still carries it; one from
    :func:`load_rgb` no longer does, so converting twice changes nothing).

    Example:
        >>> import numpy as np
        >>> clear = Image.new("RGBA", (2, 1), (255, 0, 0, 0))  # fully transparent red
        >>> as_rgb(clear).getpixel((0, 0))
        (255, 255, 255)
        >>> as_rgb(Image.fromarray(np.full((1, 2), 32896, np.uint16))).getpixel((0, 0))
        (128, 128, 128)
    """
    from PIL import ImageOps

    upright = ImageOps.exif_transpose(image)
    return _to_rgb(upright if upright is not None else image)


_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


class _NotRegularFileError(FeaturescopeError, OSError):
    """A FIFO, socket or device where an image file was expected: an ``OSError`` like a
    missing file, for callers that skip unreadable files, and a featurescope error."""


def _not_regular(path: PathLike) -> str | None:
    """``None`` if ``path`` is a regular file (after symbolic links), else what it is instead.

    Checked before :func:`PIL.Image.open`, which would wait forever on a named pipe with no
    writer, or read a device without end.

    Example:
        >>> import os, tempfile
        >>> fifo = os.path.join(tempfile.mkdtemp(), "pipe.jpg")
        >>> os.mkfifo(fifo)
        >>> _not_regular(fifo)
        'not a regular file: a named pipe (FIFO)'
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:  # a dangling symbolic link, or no permission to look
        return f"{type(exc).__name__}: {exc.strerror}"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a file")
    return f"not a regular file: {kind}"


def _check_readable(path: Path) -> str | None:
    """``None`` if ``path`` decodes as an image, else why not.

    JPEGs are decoded at reduced scale (``draft``): that still reads every byte, so a truncated
    file fails, at a fraction of the cost of a full decode.
    """
    not_regular = _not_regular(path)
    if not_regular is not None:
        return not_regular
    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))
            img.load()
    except Exception as exc:  # PIL raises many types for bad files; all mean "unreadable"
        return f"{type(exc).__name__}: {exc}"
    return None


def _class_folders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _files(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every file under ``folder``, recursively and sorted, and the folders left out and why.

    Hidden files and folders are left out silently. Symbolic links to folders are followed,
    but a folder already walked (the same device and inode, e.g. ``ln -s . self`` or two links
    pointing at each other) is walked once: it is listed as skipped, never walked again, so a
    loop neither multiplies the images nor hangs. Folders that cannot be listed are skipped.

    Example:
        >>> import os, pathlib, tempfile
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "a.png").touch()
        >>> os.symlink(".", root / "self")
        >>> files, skipped = _files(root)
        >>> [f.name for f in files], [(os.path.basename(p), why) for p, why in skipped]
        (['a.png'], [('self', 'a symbolic link to a folder already read (a loop)')])
    """
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    with contextlib.suppress(OSError):
        top = os.stat(folder)
        seen.add((top.st_dev, top.st_ino))

    def unreadable(exc: OSError) -> None:
        skipped.append((str(exc.filename), f"folder not readable: {exc.strerror}"))

    for dirpath, dirnames, names in os.walk(folder, followlinks=True, onerror=unreadable):
        kept = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            path = os.path.join(dirpath, d)
            try:
                st = os.stat(path)
            except OSError as exc:
                skipped.append((path, f"{type(exc).__name__}: {exc.strerror}"))
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                skipped.append((path, "a symbolic link to a folder already read (a loop)"))
                continue
            seen.add(key)
            kept.append(d)
        dirnames[:] = kept
        files += [Path(dirpath) / n for n in names if not n.startswith(".")]
    return sorted(files), skipped


def _has_images(folder: Path, extensions: tuple[str, ...]) -> bool:
    with os.scandir(folder) as entries:
        return any(
            e.is_file() and e.name.lower().endswith(extensions) and not e.name.startswith(".")
            for e in entries
        )


def _skipped_message(root: Path, skipped: Sequence[tuple[str, str]], total: int) -> str:
    """One line: how many files were skipped, and the first ones by name with the reason."""

    def item(path: str, why: str) -> str:
        # PIL's reasons repeat the file's path, which the item already starts with.
        why = printable(why.replace(f" {path!r}", ""))
        return f"{printable(os.path.relpath(path, root))} ({why})"

    listed = "; ".join(item(p, why) for p, why in skipped[:_LISTED])
    more = f"; and {len(skipped) - _LISTED} more" if len(skipped) > _LISTED else ""
    return (
        f"skipped {len(skipped)} of {total} files in {printable(str(root))} (not readable "
        f"images): {listed}{more}"
    )


class ImageFolder(Dataset[tuple[Any, int]]):
    """Images of a folder, returned as ``(transform(image), label)``: one subfolder per class, or none.

    With one subfolder per class (``root/cat/001.jpg``), each image's label is its class's
    index, as in torchvision. A folder of images without classes (flat, or nested to any depth,
    e.g. ``photos/2024/06/x.jpg``) gives every image the label ``-1`` (:data:`NO_LABEL`) and no
    ``classes``. By default a folder holding images directly is read without classes and one
    holding only subfolders with classes; ``labels=`` decides instead. Either way subfolders are
    read recursively, and hidden files and folders (``.name``) are left out.

    Args:
        root: the folder, e.g. ``pokeman/train`` or ``~/Pictures``.
        transform: applied to each RGB PIL image; default: the study's preprocessing
            (Resize 256, CenterCrop 227, ImageNet normalisation), giving ``[3, 227, 227]``
            tensors. Pass ``transform=lambda image: image`` to get the PIL images.
        classes: the class names, in label order. Default: the subfolders, sorted. Give the
            training split's classes to a validation split so labels agree even where a class
            has no validation images.
        extensions: file name endings treated as images; other files are skipped (and listed).
        verify: decode every image once now and skip those that fail. Set ``False`` for a huge
            folder you trust; a bad image then fails when it is loaded.
        labels: ``True``: the subfolders are classes; ``False``: no classes, every image under
            ``root`` with label ``-1``; ``None`` (default): classes unless ``root`` holds
            images itself or has no subfolders.

    Attributes:
        samples: ``(path, label)`` per image, sorted by class then path.
        targets: the labels, in sample order.
        classes: class names, in label order (empty without classes).
        class_to_idx: class name → label.
        skipped: ``(path, reason)`` for each file left out, also listed in one
            :class:`SkippedFilesWarning`.

    Raises:
        EmptyDatasetError: ``root`` does not exist, has no readable image, or (``labels=True``)
            no class folders.
        FeaturescopeError: ``classes`` is given and ``root`` has a class folder not in it, or
            ``classes`` is given with ``labels=False``.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("cat", "dog"):
        ...     (root / name).mkdir()
        ...     Image.new("RGB", (300, 280), "red").save(root / name / "a.png")
        >>> ds = ImageFolder(root)
        >>> ds.classes, len(ds)
        (['cat', 'dog'], 2)
        >>> image, label = ds[1]
        >>> tuple(image.shape), label
        ((3, 227, 227), 1)
        >>> unlabelled = ImageFolder(root, labels=False)
        >>> unlabelled.classes, unlabelled.targets
        ([], [-1, -1])
    """

    def __init__(
        self,
        root: PathLike,
        transform: Transform | None = None,
        *,
        classes: Sequence[str] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        verify: bool = True,
        labels: bool | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            raise EmptyDatasetError(
                f"image folder {str(self.root)!r} {what}; expected images in it, or one "
                f"subfolder per class, e.g. {self.root / 'cat' / '001.jpg'}"
            )
        exts = tuple(e.lower() for e in extensions)
        found = _class_folders(self.root)
        if labels is None:
            labels = bool(found) and not _has_images(self.root, exts)
        if labels and not found:
            raise EmptyDatasetError(_no_classes_message(self.root, exts))
        if not labels and classes is not None:
            raise FeaturescopeError(
                f"classes={list(classes)} was given for {self.root}, read without classes "
                "(labels=False, or images directly in it); drop classes= or pass labels=True"
            )
        if not labels:
            classes = []
        elif classes is None:
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise FeaturescopeError(
                    f"{self.root} has class folders {unknown} that are not among the classes "
                    f"{list(classes)} (usually the training split's); every split must use the "
                    "same class names"
                )
        self.classes: list[str] = list(classes)
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.transform: Transform = transform if transform is not None else _study_transform()

        self.skipped: list[tuple[str, str]] = []
        self.samples: list[tuple[str, int]] = []
        groups = [(self.root / c, self.class_to_idx[c]) for c in found] if labels else []
        for folder, label in groups or [(self.root, NO_LABEL)]:
            files, left_out = _files(folder)
            self.skipped += left_out
            for path in files:
                if not path.name.lower().endswith(exts):
                    self.skipped.append(
                        (str(path), f"not an image file ({path.suffix or 'no extension'})")
                    )
                    continue
                reason = _check_readable(path) if verify else _not_regular(path)
                if reason is None:
                    self.samples.append((str(path), label))
                else:
                    self.skipped.append((str(path), reason))
        if labels:  # loose files beside the class folders are not part of any class
            self.skipped += [
                (str(self.root / e.name), "outside the class folders")
                for e in sorted(os.scandir(self.root), key=lambda e: e.name)
                if e.is_file() and not e.name.startswith(".")
            ]
        if self.skipped:
            total = len(self.samples) + len(self.skipped)
            warnings.warn(
                _skipped_message(self.root, self.skipped, total), SkippedFilesWarning, stacklevel=2
            )
        if not self.samples:
            where = f"class folders {found}" if labels else "it or its subfolders"
            expected = (
                "" if found else f"; expected images in it, or {self.root / '<class>' / '<image>'}"
            )
            raise EmptyDatasetError(
                f"{self.root} has no readable image in {where} ({len(self.skipped)} "
                f"unreadable file(s)){expected}; image files end in {', '.join(exts)}"
            )

    @property
    def targets(self) -> list[int]:
        """The label of every sample, in order (as torchvision's ``ImageFolder.targets``)."""
        return [label for _, label in self.samples]

    @property
    def paths(self) -> list[str]:
        """The file of every sample, in order."""
        return [path for path, _ in self.samples]

    @property
    def num_skipped(self) -> int:
        """How many images could not be read and were left out."""
        return len(self.skipped)

    @property
    def labelled(self) -> bool:
        """Whether the images have classes (else every label is ``-1``)."""
        return bool(self.classes)

    def class_counts(self) -> dict[str, int]:
        """Images per class, every class listed (zero where a class has none); ``{}`` without classes."""
        counts = dict.fromkeys(self.classes, 0)
        for _, label in self.samples:
            if label != NO_LABEL:
                counts[self.classes[label]] += 1
        return counts

    def subset(self, indices: Sequence[int]) -> ImageFolder:
        """A dataset of the samples at ``indices``, with the same classes and transform."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.samples = [self.samples[i] for i in indices]
        clone.skipped = []
        return clone

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except Exception as exc:
            raise FeaturescopeError(
                f"cannot read image {path}: {type(exc).__name__}: {exc} (open the folder with "
                "verify=True to skip unreadable images up front)"
            ) from exc
        return self.transform(image), label

    def __repr__(self) -> str:
        classes = f"{len(self.classes)} classes" if self.classes else "no classes"
        return (
            f"{type(self).__name__}({str(self.root)!r}, {len(self)} images, "
            f"{classes}, {self.num_skipped} skipped)"
        )


def _study_transform() -> Transform:
    from featurescope.data.transforms import STUDY_PREPROCESSING

    return STUDY_PREPROCESSING.transform()


def _no_classes_message(root: Path, extensions: tuple[str, ...]) -> str:
    loose = [p.name for p in root.iterdir() if p.name.lower().endswith(extensions)]
    hint = (
        f" It holds {len(loose)} image(s) directly; move them into one subfolder per class, "
        "or read them without classes (labels=False)."
        if loose
        else ""
    )
    return f"{root} has no class subfolders; expected {root / '<class>' / '<image>'}.{hint}"


@dataclass(frozen=True)
class DatasetSplits:
    """The splits of a ``root/{train,val,test}`` image folder; missing splits are ``None``.

    Attributes:
        root: the dataset's root folder.
        train: the training images.
        val: the validation images, if ``root/val`` exists (or was split off ``train``).
        test: the test images, if ``root/test`` exists.
    """

    root: Path
    train: ImageFolder
    val: ImageFolder | None = None
    test: ImageFolder | None = None

    @property
    def classes(self) -> list[str]:
        """The class names, in label order (the training split's)."""
        return self.train.classes

    @property
    def eval(self) -> ImageFolder | None:
        """The split to validate on: ``val`` if there is one, else ``test`` (as in the study)."""
        return self.val if self.val is not None else self.test


def _stratified_split(
    data: ImageFolder, fraction: float, seed: int
) -> tuple[ImageFolder, ImageFolder]:
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(data.samples):
        by_class.setdefault(label, []).append(i)
    keep: list[int] = []
    held: list[int] = []
    for label in sorted(by_class):
        idx = by_class[label]
        order = torch.randperm(len(idx), generator=generator).tolist()
        # At least one image of each class for validation and one for training: a class
        # of n images holds out 1..n-1 of them, and a lone image stays in training.
        n_held = min(max(1, round(len(idx) * fraction)), len(idx) - 1)
        held += sorted(idx[j] for j in order[:n_held])
        keep += sorted(idx[j] for j in order[n_held:])
    if not held:
        raise EmptyDatasetError(
            f"val_fraction={fraction}: the validation split is empty because every class in "
            f"{data.root} has a single image, and a lone image stays in training. Add images, "
            f"or put validation images in {data.root.parent / 'val'} (one subfolder per class)"
        )
    return data.subset(sorted(keep)), data.subset(sorted(held))


def load_image_folders(
    root: PathLike,
    *,
    transform: Transform | None = None,
    train_transform: Transform | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    verify: bool = True,
) -> DatasetSplits:
    """Open a dataset laid out as ``root/train``, ``root/val`` and ``root/test``.

    Only ``train`` is required; the study itself had ``pokeman/train`` and ``pokeman/test``.
    Every split uses the training split's classes, so labels agree across splits; a split of
    images without class subfolders has none (every label ``-1``, see :class:`ImageFolder`).

    Args:
        root: the dataset's root folder.
        transform: for the validation and test images; default: the study's preprocessing.
        train_transform: for the training images; default: ``transform`` (e.g. pass
            :func:`~featurescope.data.train_transform` for augmentation).
        val_fraction: when there is no ``root/val``, hold out this fraction of each training
            class (chosen with ``seed``) as the validation split, rounded but at least one
            image and never all of a class (a class with one image stays in training).
        seed: seeds the held-out choice of ``val_fraction``.
        verify: decode every image once and skip unreadable ones (see :class:`ImageFolder`).

    Returns:
        The :class:`DatasetSplits`.

    Raises:
        EmptyDatasetError: ``root`` or ``root/train`` is missing, or a split is empty (also
            when ``val_fraction`` finds no class with two images to split).

    Example:
        >>> import tempfile
        >>> from featurescope.data import make_synthetic_dataset
        >>> root = make_synthetic_dataset(tempfile.mkdtemp() + "/s", train_per_class=3,
        ...                               val_per_class=1, test_per_class=0, size=32)
        >>> splits = load_image_folders(root)
        >>> len(splits.train), len(splits.val), splits.test is None
        (15, 5, True)
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise EmptyDatasetError(
            f"dataset folder {str(base)!r} does not exist; expected {base / 'train'} (and "
            f"optionally {base / 'val'}, {base / 'test'}) with one subfolder per class"
        )
    if not (base / "train").is_dir():
        found = _class_folders(base)
        hint = (
            f" It has folders {found}: if these are the classes, put them under "
            f"{base / 'train'}, or open the folder with ImageFolder({str(base)!r})."
            if found
            else ""
        )
        raise EmptyDatasetError(
            f"{base} has no 'train' folder; expected {base / 'train' / '<class>' / '<image>'}."
            + hint
        )
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise FeaturescopeError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    train_tf = train_transform if train_transform is not None else transform
    train = ImageFolder(base / "train", train_tf, verify=verify)
    classes = train.classes

    def split(name: str) -> ImageFolder | None:
        folder = base / name
        if not folder.is_dir():
            return None
        if not train.labelled:  # the training images have no classes: nor have the others
            return ImageFolder(folder, transform, verify=verify, labels=False)
        return ImageFolder(folder, transform, classes=classes, verify=verify)

    val, test = split("val"), split("test")
    if val is None and val_fraction is not None:
        train, val = _stratified_split(train, val_fraction, seed)
        val.transform = transform if transform is not None else _study_transform()
    return DatasetSplits(root=base, train=train, val=val, test=test)
