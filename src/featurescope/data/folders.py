"""Image folders: ``root/<class>/<image>`` datasets, and the study's ``root/{train,val,test}``.

:class:`ImageFolder` reads the same layout as torchvision's and exposes the same ``samples``,
``targets``, ``classes`` and ``class_to_idx``, so code written for torchvision keeps working and
:meth:`featurescope.FeatureTap.extract` finds each image's label and path. Unlike torchvision's,
it checks every image once when the folder is opened and skips those it cannot read, with a
count and one warning, instead of crashing mid-epoch; and a missing or empty folder is an error
that says what was expected.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from featurescope.errors import EmptyDatasetError, FeaturescopeError, FeaturescopeWarning

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetSplits",
    "EmptyDatasetError",
    "ImageFolder",
    "load_image_folders",
]

#: File extensions (lower case) treated as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif",
)  # fmt: skip

PathLike = str | os.PathLike[str]
Transform = Callable[[Image.Image], Any]


def load_rgb(path: PathLike) -> Image.Image:
    """Open an image file as RGB, decoding it fully (so a truncated file fails here)."""
    with Image.open(path) as img:
        rgb: Image.Image = img.convert("RGB")
    return rgb


def _check_readable(path: Path) -> str | None:
    """``None`` if ``path`` decodes as an image, else why not.

    JPEGs are decoded at reduced scale (``draft``): that still reads every byte, so a truncated
    file fails, at a fraction of the cost of a full decode.
    """
    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))
            img.load()
    except Exception as exc:  # PIL raises many types for bad files; all mean "unreadable"
        return f"{type(exc).__name__}: {exc}"
    return None


def _class_folders(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    files = [
        Path(dirpath) / name
        for dirpath, dirnames, names in os.walk(folder, followlinks=True)
        for name in names
        if name.lower().endswith(extensions) and not name.startswith(".")
    ]
    return sorted(files)


class ImageFolder(Dataset[tuple[Any, int]]):
    """Images in one folder per class, returned as ``(transform(image), label)``.

    Args:
        root: a folder with one subfolder per class, e.g. ``pokeman/train``.
        transform: applied to each RGB PIL image; default: the study's preprocessing
            (Resize 256, CenterCrop 227, ImageNet normalisation), giving ``[3, 227, 227]``
            tensors. Pass ``transform=lambda image: image`` to get the PIL images.
        classes: the class names, in label order. Default: the subfolders, sorted. Give the
            training split's classes to a validation split so labels agree even where a class
            has no validation images.
        extensions: file name endings treated as images.
        verify: decode every image once now and skip (with a warning) those that fail. Set
            ``False`` for a huge folder you trust; a bad image then fails when it is loaded.

    Attributes:
        samples: ``(path, label)`` per image, sorted by class then path.
        targets: the labels, in sample order.
        classes: class names, in label order.
        class_to_idx: class name → label.
        skipped: ``(path, reason)`` for each image that could not be read.

    Raises:
        EmptyDatasetError: ``root`` does not exist, has no class folders, or no readable image.
        FeaturescopeError: ``classes`` is given and ``root`` has a class folder not in it.

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
    """

    def __init__(
        self,
        root: PathLike,
        transform: Transform | None = None,
        *,
        classes: Sequence[str] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        verify: bool = True,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            raise EmptyDatasetError(
                f"image folder {str(self.root)!r} {what}; expected one subfolder per class, "
                f"e.g. {self.root / 'cat' / '001.jpg'}"
            )
        found = _class_folders(self.root)
        if not found:
            raise EmptyDatasetError(_no_classes_message(self.root, tuple(extensions)))
        if classes is None:
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
        exts = tuple(e.lower() for e in extensions)

        self.skipped: list[tuple[str, str]] = []
        self.samples: list[tuple[str, int]] = []
        for name in found:
            for path in _image_files(self.root / name, exts):
                reason = _check_readable(path) if verify else None
                if reason is None:
                    self.samples.append((str(path), self.class_to_idx[name]))
                else:
                    self.skipped.append((str(path), reason))
        if self.skipped:
            first_path, first_reason = self.skipped[0]
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image(s) in {self.root} "
                f"(first: {first_path}: {first_reason}); see the dataset's .skipped",
                FeaturescopeWarning,
                stacklevel=2,
            )
        if not self.samples:
            raise EmptyDatasetError(
                f"{self.root} has class folders {found} but no readable image in them "
                f"({len(self.skipped)} unreadable); image files end in {', '.join(exts)}"
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

    def class_counts(self) -> dict[str, int]:
        """Images per class, every class listed (zero where a class has none)."""
        counts = dict.fromkeys(self.classes, 0)
        for _, label in self.samples:
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
        return (
            f"{type(self).__name__}({str(self.root)!r}, {len(self)} images, "
            f"{len(self.classes)} classes, {self.num_skipped} skipped)"
        )


def _study_transform() -> Transform:
    from featurescope.data.transforms import STUDY_PREPROCESSING

    return STUDY_PREPROCESSING.transform()


def _no_classes_message(root: Path, extensions: tuple[str, ...]) -> str:
    loose = [p.name for p in root.iterdir() if p.name.lower().endswith(extensions)]
    hint = (
        f" It holds {len(loose)} image(s) directly; move them into one subfolder per class."
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
    Every split uses the training split's classes, so labels agree across splits.

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
        return ImageFolder(folder, transform, classes=classes, verify=verify)

    val, test = split("val"), split("test")
    if val is None and val_fraction is not None:
        train, val = _stratified_split(train, val_fraction, seed)
        val.transform = transform if transform is not None else _study_transform()
    return DatasetSplits(root=base, train=train, val=val, test=test)
