"""Writing pages: the explorer of an image search, a page of units alone, reading data back."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurescope._io import atomic_open
from featurescope._version import __version__
from featurescope.errors import FeaturescopeError
from featurescope.pages._build import build_explorer_data
from featurescope.pages._render import parse, render_explorer, render_units_page
from featurescope.pages._units import Method, Reduce, UnitsSpec, build_units
from featurescope.pages._words import weights_sentence

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from featurescope.data.transforms import Preprocessing
    from featurescope.study import ImageSearch
    from featurescope.units import TopActivations

__all__ = [
    "query_images",
    "read_explorer_data",
    "write_explorer",
    "write_units_page",
]

PathLike = str | os.PathLike[str]


def _write(out: PathLike, text: str) -> Path:
    target = Path(out)
    with atomic_open(target, encoding="utf-8") as fh:
        fh.write(text)
    return target


def write_explorer(
    out: PathLike, search: ImageSearch, queries: Sequence[PathLike], **options: Any
) -> Path:
    """Write the explorer page of ``search`` queried by ``queries`` to the file ``out``.

    One file that works from ``file://`` with no server and no network request: the data of
    :func:`~featurescope.pages.build_explorer_data` sits inline as JSON and a small vanilla
    script draws it. Its contract for tests: each query thumbnail carries
    ``data-fs-query="<query index>"``, each neighbour shown ``data-fs-neighbour="<gallery
    id>"``, each channel tile ``data-fs-channel="<stage node>:<channel>"``, each training run
    ``data-fs-run="<name>"``, each projected point ``data-fs-point="<gallery id>"``, each unit
    tile ``data-fs-unit="<node>:<channel>"`` and each of a unit's examples
    ``data-fs-unit-example="<rank>"``; :func:`read_explorer_data` returns the page's data.

    Args:
        out: the HTML file to write (atomically).
        search: the model and the gallery index.
        queries: query image files; those that cannot be read are left out and named on the
            page.
        **options: as :func:`~featurescope.pages.build_explorer_data` takes them
            (``query_labels``, ``runs``, ``metrics``, ``k``, ``stages``, ``projection``,
            ``title``, ``splits``, ``keep_self``, ``similarity``, ``units``, ...).

    Returns:
        The path written.

    Raises:
        FeaturescopeError: no queries, none readable, or an option is invalid.

    Example:
        >>> import pathlib, tempfile, featurescope as fs
        >>> from featurescope.pages import read_explorer_data, write_explorer
        >>> root = fs.make_synthetic_dataset(tempfile.mkdtemp(), train_per_class=2,
        ...                                  val_per_class=0, test_per_class=1, size=32)
        >>> search = fs.ImageSearch.build(fs.create_model("alexnet_half"), root, progress=False)
        >>> test = fs.ImageFolder(root / "test")
        >>> page = write_explorer(root / "explorer.html", search, test.paths,
        ...                       query_labels=test.targets, k=3)
        >>> data = read_explorer_data(page)
        >>> data["weights"], data["queries"][0]["name"], len(data["queries"][0]["neighbours"])
        ('random', 'circle_0000.png', 3)
    """
    data = build_explorer_data(search, queries, **options)
    return _write(out, render_explorer(data))


def _dataset(
    model: nn.Module,
    data: PathLike | Dataset[Any] | torch.Tensor,
    preprocessing: Preprocessing | None,
) -> tuple[Any, Preprocessing | None, Any, Any]:
    """``(dataset, preprocessing to undo, name of image i, label of image i)``."""
    if isinstance(data, (str, os.PathLike)):
        from featurescope.data import ImageFolder
        from featurescope.zoo import resolve_preprocessing

        used = resolve_preprocessing(model, preprocessing)
        folder = ImageFolder(data, used.transform())
        root = Path(data)
        paths = [Path(p) for p in folder.paths]

        def name(i: int) -> str:
            return (
                paths[i].relative_to(root).as_posix()
                if paths[i].is_relative_to(root)
                else paths[i].name
            )

        return folder, used, name, lambda i: int(folder.targets[i])
    return data, preprocessing, lambda i: f"image {i}", lambda i: -1


def write_units_page(
    out: PathLike,
    model: nn.Module,
    data: PathLike | Dataset[Any] | torch.Tensor,
    nodes: Sequence[str],
    *,
    k: int = 9,
    reduce: Reduce = "max",
    projections: Sequence[Method] = ("deconvnet", "guided"),
    project_top: int | None = None,
    top: Mapping[str, TopActivations] | None = None,
    preprocessing: Preprocessing | None = None,
    batch_size: int = 16,
    title: str | None = None,
) -> Path:
    """Write a page of what each channel of ``nodes`` sees over ``data``: the Units section alone.

    Pick a stage, see every channel as a tile (its strongest patch), click one for its top
    ``k`` patches, their deconvnet and guided-backprop projections, their source images and
    the channel's map on each. One file, offline, with the explorer's CSP and contract
    (``data-fs-unit="<node>:<channel>"`` tiles, ``data-fs-unit-example="<rank>"`` rows).

    Args:
        out: the HTML file to write (atomically), e.g. ``DIR / "units.html"``.
        model: any model :func:`~featurescope.units.top_activations` runs.
        data: an image folder (read with the model's preprocessing, or ``preprocessing``;
            images named by their path below it), or a dataset of images (or ``(image,
            label)`` pairs) or a tensor ``[N, C, H, W]`` already preprocessed (named
            ``image i``).
        nodes: the nodes whose channels are shown (maps ``[N, C, H, W]``).
        k: top activations per channel.
        reduce: ``"max"`` (Zeiler & Fergus) or ``"mean"``.
        projections: which projections each example gets (``"deconvnet"``, ``"guided"``).
        project_top: project only each channel's strongest this many examples (each is one
            backward pass); ``None``: all ``k``.
        top: a precomputed :func:`~featurescope.units.top_activations` result over ``data``
            (its image ids index ``data``); ``None``: computed here.
        preprocessing: the normalisation to undo for display (and, for a folder, how to read
            it); default: the model's own for a folder, none for a dataset or tensor.
        batch_size: images per forward pass.
        title: the page's title (default: names the model and the nodes).

    Returns:
        The path written.

    Raises:
        FeaturescopeError: no nodes, a node without maps, an unknown projection, or no image.

    Example:
        >>> import tempfile, pathlib, torch
        >>> from featurescope.pages import read_explorer_data, write_units_page
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        >>> page = write_units_page(pathlib.Path(tempfile.mkdtemp()) / "units.html", model,
        ...                         torch.rand(6, 3, 8, 8), ["1"], k=2)
        >>> units = read_explorer_data(page)["units"]
        >>> units["stages"][0]["channels"], len(units["stages"][0]["units"][0]["top"])
        (4, 2)
    """
    from featurescope.zoo import model_metadata

    dataset, shown, name, label = _dataset(model, data, preprocessing)
    spec = UnitsSpec(
        list(nodes),
        k=k,
        reduce=reduce,
        projections=tuple(projections),
        project_top=project_top,
        top=top,
    )
    pictures: list[str] = []
    units = build_units(
        model,
        dataset,
        spec,
        pictures,
        preprocessing=shown,
        names=name,
        labels=label,
        batch_size=batch_size,
    )
    meta = model_metadata(model)
    architecture = meta.architecture if meta is not None else type(model).__name__
    weights = meta.weights if meta is not None else None
    page = {
        "title": title or f"featurescope units: {architecture} ({', '.join(spec.nodes)})",
        "version": __version__,
        "model": architecture,
        "weights": weights,
        "weights_sentence": weights_sentence(weights),
        "classes": list(getattr(dataset, "classes", []) or []),
        "images": pictures,
        "units": units,
    }
    return _write(out, render_units_page(page))


def read_explorer_data(page: PathLike) -> dict[str, Any]:
    """The data an explorer page carries (its ``<script id="fs-data">`` JSON), for tests and
    for tools that read the page back.

    Raises:
        FeaturescopeError: the file is not an explorer page.
    """
    data = parse(Path(page).read_text(encoding="utf-8"))
    if not data:
        raise FeaturescopeError(f"{os.fspath(page)!r} is not a featurescope page (no fs-data)")
    return data


def query_images(
    images: PathLike, class_names: Sequence[str] | None = None, *, limit: int = 100
) -> tuple[list[str], list[int]]:
    """Image files under ``images`` (a folder, searched recursively, or one file), sorted, with
    labels: the index of the parent folder's name in ``class_names``, else ``-1``.

    At most ``limit`` files are taken, evenly spaced through the sorted list.

    Raises:
        EmptyDatasetError: no image file there.
    """
    from featurescope.data.folders import IMAGE_EXTENSIONS
    from featurescope.errors import EmptyDatasetError

    root = Path(images)
    suffixes = tuple(e.lower() for e in IMAGE_EXTENSIONS)
    files = (
        [root]
        if root.is_file()
        else sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    )
    if not files:
        raise EmptyDatasetError(f"no image files ({', '.join(suffixes)}) under {str(root)!r}")
    if len(files) > limit:
        files = [files[round(i * (len(files) - 1) / (limit - 1))] for i in range(limit)]
    lookup = {name: i for i, name in enumerate(class_names or [])}
    return [str(f) for f in files], [lookup.get(f.parent.name, -1) for f in files]
