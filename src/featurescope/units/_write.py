"""What a network's channels see, written to a folder: figures, patches, projections, units.json.

:func:`write_units` ranks every channel's top images (:func:`top_activations`, resumable from
``out/state``), crops each top activation's receptive field out of its image as the model saw
it (:func:`patch`), projects it back to pixels (:func:`projections`) and writes::

    units.json               plain data, see :func:`write_units`
    <node>.png               the ``units`` figure of the node's strongest channels
    <node>/c<channel>_<rank>.png              each top activation's patch
    <node>/c<channel>_<rank>_<projection>.png its projection, drawn signed (grey is zero)
    state/                   the running top k, so that an interrupted run resumes
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from featurescope._io import atomic_open
from featurescope._torch_utils import model_device
from featurescope.errors import FeaturescopeError
from featurescope.tap import ReceptiveField, receptive_fields
from featurescope.units._patch import patch
from featurescope.units._project import projections
from featurescope.units._top import Reduce, TopActivations, top_activations
from featurescope.zoo import model_metadata, model_name

__all__ = ["UNITS_FILE", "write_units"]

UNITS_FILE = "units.json"
FORMAT = "featurescope.units"
VERSION = 1

Projection = Literal["deconvnet", "guided"]


def write_units(
    model: nn.Module,
    data: Dataset[Any] | DataLoader[Any] | torch.Tensor,
    nodes: Sequence[str],
    out: str | os.PathLike[str],
    *,
    k: int = 9,
    projection: Projection | None = "deconvnet",
    reduce: Reduce = "max",
    figure_channels: int = 16,
    file_channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    resume: bool = False,
    progress: bool = True,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Find what each channel of ``nodes`` responds to over ``data``, and write it to ``out``.

    Zeiler & Fergus's figure for any model and dataset: every channel's ``k`` strongest images,
    the patch each activation reads and its projection back to pixels, as PNG files, a figure
    per node and ``units.json``.

    ``units.json`` holds ``format`` (``"featurescope.units"``), ``version`` (1), ``model``,
    ``k``, ``reduce``, ``projection`` (or ``null``), ``num_images``, ``input_size``
    (``[height, width]``) and ``nodes``: a list with, per node, ``node``, ``grid`` (its
    ``[height, width]``), ``receptive_field`` (``stride``, ``size``, ``offset`` per axis,
    ``is_global``), ``figure`` and ``channels``: per channel, ``channel`` and ``top``, its
    activations strongest first (fewer than ``k`` when the data has fewer images), each with
    ``rank``, ``value``, ``image_id`` (the index into ``data``), ``file`` (the image's file
    where the dataset lists them, else ``null``), ``position`` (``[row, column]`` on the
    node's grid), ``box`` (``[top, left, bottom, right]`` input pixels, ends exclusive),
    ``patch`` and ``projection`` (files relative to ``out``; ``projection`` is ``null``
    without projections). Values are floats; the files use ``/``.

    Args:
        model: any model :class:`~featurescope.FeatureTap` and
            :func:`~featurescope.tap.receptive_fields` handle (run in eval mode).
        data: a map-style dataset of preprocessed images (or ``(image, label)`` pairs), a
            DataLoader over one, or a tensor ``[N, C, H, W]``; all images of one size.
        nodes: the nodes whose channels to show.
        out: the output folder (created if needed).
        k: how many top images per channel.
        projection: ``"deconvnet"`` (Zeiler & Fergus), ``"guided"`` (guided backpropagation)
            or ``None`` for patches alone.
        reduce: how an image's map scores it: ``"max"`` (its strongest position) or ``"mean"``.
        figure_channels: how many channels each node's figure shows: those with the strongest
            top activation, in channel order.
        file_channels: how many channels of each node, the strongest (at least the figure's),
            get patch and projection files; ``None``: every channel. ``units.json`` lists
            every channel's top activations either way (``patch`` and ``projection`` are
            ``null`` for the others). A projection costs a backward pass, and patches of deep
            nodes are large: a few dozen channels show what a node does.
        mean: the per-channel mean the preprocessing subtracted, to undo for the patches;
            default: the zoo model's preprocessing, else none.
        std: the per-channel standard deviation it divided by.
        batch_size: images per forward pass, and activations per projection pass.
        device: where to run; default the model's device.
        resume: take up the ranking an interrupted run left in ``out/state`` (refused if that
            run was over other data, weights, nodes, ``k`` or ``reduce``); else start afresh.
        progress: show progress bars.
        num_workers: DataLoader workers for a dataset.

    Returns:
        What ``units.json`` holds.

    Raises:
        FeaturescopeError: an unknown projection, ``figure_channels`` under 1, a node
            without a grid or whose receptive field cannot be found, or any error of
            :func:`top_activations`.

    Example:
        >>> import tempfile, torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
        >>> units = write_units(model, torch.rand(6, 3, 8, 8), ["1"], tempfile.mkdtemp(), k=2,
        ...                     progress=False)
        >>> channel = units["nodes"][0]["channels"][3]
        >>> [(t["rank"], t["box"][2] - t["box"][0]) for t in channel["top"]]
        [(0, 3), (1, 3)]
        >>> channel["top"][0]["patch"], channel["top"][0]["projection"]
        ('1/c0003_0.png', '1/c0003_0_deconvnet.png')
    """
    if projection not in ("deconvnet", "guided", None):
        raise FeaturescopeError(
            f"projection must be 'deconvnet', 'guided' or None, got {projection!r}"
        )
    for name, value in (("figure_channels", figure_channels), ("file_channels", file_channels)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise FeaturescopeError(f"{name} must be a positive integer, got {value!r}")
    nodes = [nodes] if isinstance(nodes, str) else list(nodes)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    # units.json is written last and names every file: until then, none from an older run.
    (folder / UNITS_FILE).unlink(missing_ok=True)
    top = top_activations(
        model,
        data,
        nodes,
        k,
        reduce=reduce,
        batch_size=batch_size,
        device=device,
        out=folder / "state",
        overwrite=not resume,
        progress=progress,
        num_workers=num_workers,
    )
    images = _Images(data)
    first = images[0]
    fields = receptive_fields(model, nodes, tuple(first.shape))
    if mean is None and std is None:
        meta = model_metadata(model)
        if meta is not None and meta.preprocessing is not None:
            mean, std = meta.preprocessing.mean, meta.preprocessing.std
    written = []
    for node in nodes:
        writer = _NodeWriter(folder, node, fields[node], mean, std, projection)
        filed = max(figure_channels, file_channels or top[node].values.shape[0])
        shown = (figure_channels, filed)
        written.append(writer.write(model, top[node], images, batch_size, shown, progress))
    meta = model_metadata(model)
    units = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_name(model),
        "k": k,
        "reduce": reduce,
        "projection": projection,
        "num_images": len(images),
        "input_size": list(first.shape[-2:]),
        "nodes": written,
    }
    with atomic_open(folder / UNITS_FILE, "w", encoding="utf-8") as fh:
        json.dump(units, fh, separators=(",", ":"))
    return units


class _Images:
    """The images of ``data`` by dataset index, as the model takes them."""

    def __init__(self, data: Dataset[Any] | DataLoader[Any] | torch.Tensor) -> None:
        self.dataset = data.dataset if isinstance(data, DataLoader) else data
        samples = getattr(self.dataset, "samples", None)
        self.files: Sequence[Any] | None = samples if isinstance(samples, Sequence) else None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.dataset[index]
        image = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise FeaturescopeError(
                f"write_units takes datasets of image tensors [C, H, W]; item {index} gives "
                f"{type(image).__name__}"
            )
        return image

    def file(self, index: int) -> str | None:
        if self.files is None:
            return None
        return os.fsdecode(self.files[index][0])


def _stem(node: str) -> str:
    """A folder and file name for ``node`` (a node name may hold any character)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", node).strip(".") or "node"


def _png(image: torch.Tensor, path: Path) -> None:
    """``[C, h, w]`` in ``[0, 1]`` (C 1 or 3) as an 8-bit PNG.

    Not atomically (thousands of syncs would double the time): units.json, which names the
    files, is written last and atomically, and removed at the start of a run.
    """
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    array = np.moveaxis(array, 0, -1)
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    picture.save(path, format="PNG", compress_level=1)


def _signed(projection: torch.Tensor) -> torch.Tensor:
    """A projection for display: zero grey, its largest magnitude black or white."""
    scale = float(projection.abs().max()) or 1.0
    return projection / (2 * scale) + 0.5


class _NodeWriter:
    """One node's patches, projections, figure and entry of ``units.json``."""

    def __init__(
        self,
        folder: Path,
        node: str,
        field: ReceptiveField,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        projection: Projection | None,
    ) -> None:
        self.folder = folder
        self.node = node
        self.stem = _stem(node)
        self.field = field
        self.mean, self.std = mean, std
        self.projection = projection

    def write(
        self,
        model: nn.Module,
        top: TopActivations,
        images: _Images,
        batch_size: int,
        shown: tuple[int, int],
        progress: bool,
    ) -> dict[str, Any]:
        """Write the node's files; ``shown``: how many channels, the strongest, are drawn and
        how many get files."""
        from featurescope._progress import progress as progress_bar

        (self.folder / self.stem).mkdir(exist_ok=True)
        strongest = torch.argsort(-top.values[:, 0].double(), stable=True).tolist()
        filed = set(strongest[: shown[1]])
        drawn: dict[int, dict[int, Any]] = {c: {} for c in sorted(strongest[: shown[0]])}
        channels = {c: [self._entry(top, images, c, r) for r in range(top.values.shape[1])]
                    for c in range(top.values.shape[0])}  # fmt: skip
        todo = [(c, r) for c in sorted(filed) for r, e in enumerate(channels[c]) if e is not None]
        with progress_bar(len(todo), self.node, unit="unit", enabled=progress) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                for (c, r), pair in zip(chunk, self._files(model, top, images, chunk), strict=True):
                    entry = channels[c][r]
                    assert entry is not None
                    entry["patch"], entry["projection"] = pair[2], pair[3]
                    if c in drawn:
                        drawn[c][r] = pair[:2]
                bar.update(len(chunk))
        return {
            "node": self.node,
            "grid": list(top.grid),
            "receptive_field": {
                "stride": list(self.field.stride),
                "size": list(self.field.size),
                "offset": list(self.field.offset),
                "is_global": self.field.is_global,
            },
            "figure": self._figure(top, drawn),
            "channels": [
                {"channel": c, "top": [e for e in entries if e is not None]}
                for c, entries in channels.items()
            ],
        }

    def _entry(self, top: TopActivations, images: _Images, c: int, r: int) -> dict[str, Any] | None:
        """Rank ``r`` of channel ``c`` in ``units.json`` (no files yet); ``None`` if unfilled."""
        i = int(top.image_ids[c, r])
        if i < 0:
            return None
        y, x = (int(v) for v in top.positions[c, r])
        return {
            "rank": r,
            "value": float(top.values[c, r]),
            "image_id": i,
            "file": images.file(i),
            "position": [y, x],
            "box": list(self.field.box(y, x)),
            "patch": None,
            "projection": None,
        }

    def _files(
        self, model: nn.Module, top: TopActivations, images: _Images, chunk: list[tuple[int, int]]
    ) -> list[tuple[torch.Tensor, torch.Tensor | None, str, str | None]]:
        """Write the patches (and projections) of ``chunk``: ``(patch, projection crop, patch
        file, projection file)`` each, the projections in one batched pass."""
        ids = [int(top.image_ids[c, r]) for c, r in chunk]
        loaded = {i: images[i] for i in dict.fromkeys(ids)}
        positions = [(int(top.positions[c, r, 0]), int(top.positions[c, r, 1])) for c, r in chunk]
        projected: list[torch.Tensor | None] = [None] * len(chunk)
        if self.projection is not None:
            batch = torch.stack([loaded[i] for i in ids]).to(model_device(model) or "cpu")
            channels = [c for c, _ in chunk]
            result = projections(
                model, batch, self.node, channels, positions, method=self.projection
            )
            projected = list(result.cpu())
        written = []
        for (c, r), i, (y, x), full in zip(chunk, ids, positions, projected, strict=True):
            top_, left, bottom, right = self.field.box(y, x)
            seen = patch(loaded[i], (top_, left, bottom, right), mean=self.mean, std=self.std)
            name = f"{self.stem}/c{c:04d}_{r}"
            _png(seen, self.folder / f"{name}.png")
            crop, projection_file = None, None
            if full is not None:
                crop = full[:, top_:bottom, left:right]
                projection_file = f"{name}_{self.projection}.png"
                _png(_signed(crop), self.folder / projection_file)
            written.append((seen, crop, f"{name}.png", projection_file))
        return written

    def _figure(self, top: TopActivations, drawn: dict[int, dict[int, Any]]) -> str | None:
        from featurescope.visualizers import save, visualize

        rows = {c: [pair for _, pair in sorted(ranks.items())] for c, ranks in drawn.items()}
        rows = {c: pairs for c, pairs in rows.items() if pairs}
        if not rows:
            return None
        with_projections = self.projection is not None
        title = f"{self.node}: each channel's top {top.values.shape[1]} patches"
        if with_projections:
            title += f" and their {self.projection} projections"
        figure = visualize(
            "units",
            [[p for p, _ in pairs] for pairs in rows.values()],
            projections=[[q for _, q in pairs] for pairs in rows.values()]
            if with_projections
            else None,
            channels=list(rows),
            title=title,
        )
        name = f"{self.stem}.png"
        save(figure, self.folder / name, dpi=100)
        return name
