"""The Units section's data: each channel's top activations, patches, projections and maps.

Built on :mod:`featurescope.units`: :func:`~featurescope.units.top_activations` ranks every
channel over the dataset (or a given result is used), :func:`~featurescope.units.patch` cuts
each activation's receptive field out of its image, :func:`~featurescope.units.project`
sends it back to pixels. The channel's map on each source image comes from one
:class:`~featurescope.FeatureTap` pass per batch of the distinct source images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import nn

from featurescope._torch_utils import training_mode
from featurescope.errors import FeaturescopeError
from featurescope.pages._encode import packed, picture_url, shrink
from featurescope.pages._schema import Unit, UnitExample, Units, UnitSource, UnitStage

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from featurescope.data.transforms import Preprocessing
    from featurescope.units import TopActivations

__all__ = ["UnitsSpec", "build_units"]

#: Side in pixels of a patch or projection as the page carries it (nearest-neighbour scaled).
PATCH_SIDE = 64
#: Side in pixels of a source image as the page carries it.
SOURCE_SIDE = 96
Method = Literal["deconvnet", "guided"]
Reduce = Literal["max", "mean"]
_METHODS: tuple[Method, ...] = ("deconvnet", "guided")


@dataclass(frozen=True)
class UnitsSpec:
    """Which units a page shows, and how much of each it computes.

    Args:
        nodes: the nodes whose channels are shown, as :class:`~featurescope.FeatureTap` names
            them (maps ``[N, C, H, W]``).
        k: top activations per channel.
        reduce: how an image scores a channel: ``"max"`` (Zeiler & Fergus) or ``"mean"``.
        projections: which projections each example gets: ``"deconvnet"``, ``"guided"``.
        project_top: only each channel's strongest this many examples are projected (a
            projection is one backward pass); ``None``: all ``k``.
        top: a precomputed :func:`~featurescope.units.top_activations` result over the same
            images (``{node: TopActivations}``); ``None``: computed here.
        channels: show only each node's strongest this many channels (ranked by their
            strongest activation, shown in channel order): a page of every channel of a deep
            network carries thousands of pictures; ``None``: every channel.

    Example:
        >>> UnitsSpec(["conv1"], k=4).projections
        ('deconvnet', 'guided')
    """

    nodes: Sequence[str]
    k: int = 9
    reduce: Reduce = "max"
    projections: Sequence[Method] = _METHODS
    project_top: int | None = None
    top: Mapping[str, TopActivations] | None = None
    channels: int | None = None

    def __post_init__(self) -> None:
        if self.channels is not None and (
            isinstance(self.channels, bool)
            or not isinstance(self.channels, int)
            or self.channels < 1
        ):
            raise FeaturescopeError(
                f"channels must be a positive integer or None, got {self.channels!r}"
            )
        unknown = [m for m in self.projections if m not in _METHODS]
        if unknown:
            raise FeaturescopeError(
                f"unknown projection(s) {unknown}: choose from 'deconvnet' and 'guided'"
            )
        if not list(self.nodes) and not self.top:
            raise FeaturescopeError("units need at least one node (e.g. nodes=['conv1'])")


def as_spec(units: UnitsSpec | Sequence[str] | Mapping[str, Any]) -> UnitsSpec:
    """``units`` as a :class:`UnitsSpec`: a spec, node names, or a precomputed result."""
    if isinstance(units, UnitsSpec):
        return units
    if isinstance(units, str):
        return UnitsSpec([units])
    if isinstance(units, Mapping):
        first = next(iter(units.values()), None)
        k = int(first.values.shape[1]) if first is not None else 9
        reduce = cast(Reduce, getattr(first, "reduce", "max"))
        return UnitsSpec(list(units), k=k, top=units, reduce=reduce)
    return UnitsSpec(list(units))


def _maps_of_sources(
    model: nn.Module, images: Sequence[torch.Tensor], nodes: Sequence[str], batch_size: int
) -> dict[str, torch.Tensor]:
    """Each node's ``[N, C, h, w]`` maps of ``images``: one tap pass per batch for all nodes."""
    from featurescope.tap import FeatureTap

    tap = FeatureTap(model, list(nodes))
    out: dict[str, list[torch.Tensor]] = {node: [] for node in nodes}
    with training_mode(model, False), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            answer = tap(torch.stack(list(images[start : start + batch_size])))
            for node in nodes:
                maps = answer[node]
                if not isinstance(maps, torch.Tensor) or maps.dim() != 4:
                    raise FeaturescopeError(
                        f"node {node!r} gives {tuple(getattr(maps, 'shape', ()))}: the Units "
                        "section draws maps [N, C, H, W] (choose a convolutional stage)"
                    )
                out[node].append(maps.float().cpu())
    return {node: torch.cat(parts) for node, parts in out.items()}


def build_units(
    model: nn.Module,
    data: Dataset[Any] | torch.Tensor,
    spec: UnitsSpec,
    pictures: list[str],
    *,
    preprocessing: Preprocessing | None = None,
    names: Callable[[int], str] = lambda i: f"image {i}",
    labels: Callable[[int], int] = lambda i: -1,
    batch_size: int = 16,
) -> Units:
    """The Units section of a page: every channel of ``spec.nodes`` with its top examples.

    Args:
        model: the model, as :func:`~featurescope.units.top_activations` runs it.
        data: images (a dataset of images or ``(image, label)`` pairs, or a tensor); the
            top activations' image ids index into it.
        spec: the nodes, ``k``, projections and an optional precomputed result.
        pictures: the page's pictures; each patch, projection and source image is appended
            once and named by its position.
        preprocessing: undoes the normalisation for patches and sources; ``None``: the images
            are shown as they are.
        names: an image id's name on the page.
        labels: an image id's class (``-1``: none).
        batch_size: images per forward pass.

    Returns:
        The :class:`~featurescope.pages.Units` structure.
    """
    from featurescope.tap import receptive_fields
    from featurescope.units import patch, top_activations

    nodes = list(spec.top) if spec.top is not None else list(spec.nodes)
    top = (
        dict(spec.top)
        if spec.top is not None
        else top_activations(
            model,
            data,
            nodes,
            spec.k,
            reduce=spec.reduce,
            batch_size=batch_size,
        )
    )

    def image(i: int) -> torch.Tensor:
        item = data[i]
        return (item[0] if isinstance(item, (tuple, list)) else item).detach().float().cpu()

    shown_channels = {node: _strongest(result, spec.channels) for node, result in top.items()}
    ids = sorted(
        {
            int(i)
            for node, result in top.items()
            for i in result.image_ids[shown_channels[node]].flatten().tolist()
            if i >= 0
        }
    )
    if not ids:
        raise FeaturescopeError("the units' top activations name no image")
    sources = [image(i) for i in ids]
    where = {i: position for position, i in enumerate(ids)}
    input_size = (int(sources[0].shape[-2]), int(sources[0].shape[-1]))
    fields = receptive_fields(model, nodes, input_size)
    maps = _maps_of_sources(model, sources, nodes, batch_size)
    mean = preprocessing.mean if preprocessing is not None else None
    std = preprocessing.std if preprocessing is not None else None

    def shown(x: torch.Tensor) -> torch.Tensor:
        return patch(x, (0, 0, *input_size), mean=mean, std=std)

    def add(url: str) -> int:
        pictures.append(url)
        return len(pictures) - 1

    source_entries: list[UnitSource] = [
        {"name": names(i), "image": add(picture_url(shown(x), SOURCE_SIDE)), "label": labels(i)}
        for i, x in zip(ids, sources, strict=True)
    ]
    project_top = spec.k if spec.project_top is None else spec.project_top
    stages: list[UnitStage] = []
    for position, node in enumerate(nodes):
        result, field = top[node], fields[node]
        chosen = shown_channels[node]
        projected_by = _project_tops(
            model, sources, where, node, result, chosen, project_top, spec.projections, batch_size
        )
        units: list[Unit] = []
        for channel in chosen:
            examples: list[UnitExample] = []
            for rank in range(result.values.shape[1]):
                i = int(result.image_ids[channel, rank])
                if i < 0:
                    continue  # fewer images than k
                row, col = (int(v) for v in result.positions[channel, rank])
                source = sources[where[i]]
                box = field.box(row, col)
                top_, left, bottom, right = box
                projected: dict[str, int | None] = dict.fromkeys(_METHODS)
                for method in spec.projections:
                    full = projected_by.get((method, channel, rank))
                    if full is not None:
                        crop = full[:, top_:bottom, left:right]
                        projected[method] = add(picture_url(crop, PATCH_SIDE, signed=True))
                channel_map = shrink(maps[node][where[i], channel][None])
                examples.append(
                    {
                        "source": where[i],
                        "value": float(f"{float(result.values[channel, rank]):.5g}"),
                        "position": [row, col],
                        "box": [top_, left, bottom, right],
                        "patch": add(
                            picture_url(patch(source, box, mean=mean, std=std), PATCH_SIDE)
                        ),
                        "deconvnet": projected["deconvnet"],
                        "guided": projected["guided"],
                        "map": packed(channel_map),
                    }
                )
            if examples:
                units.append({"channel": channel, "tile": examples[0]["patch"], "top": examples})
        grid = [int(v) for v in result.grid]
        shipped = [int(v) for v in shrink(torch.zeros(1, *grid)).shape[1:]]
        stages.append(
            {
                "name": node,
                "label": f"stage {position + 1} ({grid[0]}×{grid[1]})",
                "channels": int(result.values.shape[0]),
                "grid": grid,
                "shipped": shipped,
                "field": None if field.is_global else [int(s) for s in field.size],
                "units": units,
            }
        )
    return {
        "k": int(next(iter(top.values())).values.shape[1]),
        "reduce": str(next(iter(top.values())).reduce),
        "num_images": len(cast(Sized, data)),
        "input_size": list(input_size),
        "sources": source_entries,
        "stages": stages,
    }


def _project_tops(
    model: nn.Module,
    sources: list[torch.Tensor],
    where: dict[int, int],
    node: str,
    result: TopActivations,
    channels: list[int],
    project_top: int,
    methods: Sequence[str],
    batch_size: int,
) -> dict[tuple[str, int, int], torch.Tensor]:
    """Each channel's strongest ``project_top`` activations projected back to pixels, keyed by
    ``(method, channel, rank)``: ``batch_size`` activations per backward pass."""
    wanted = [
        (channel, rank, where[int(result.image_ids[channel, rank])])
        for channel in channels
        for rank in range(min(project_top, result.values.shape[1]))
        if int(result.image_ids[channel, rank]) >= 0
    ]
    from featurescope.units import projections

    done: dict[tuple[str, int, int], torch.Tensor] = {}
    for method in methods:
        for start in range(0, len(wanted), batch_size):
            chunk = wanted[start : start + batch_size]
            with training_mode(model, False):
                full = projections(
                    model,
                    torch.stack([sources[s] for _, _, s in chunk]),
                    node,
                    [channel for channel, _, _ in chunk],
                    [
                        (int(result.positions[c, r, 0]), int(result.positions[c, r, 1]))
                        for c, r, _ in chunk
                    ],
                    method=cast(Method, method),
                )
            for (channel, rank, _), one in zip(chunk, full, strict=True):
                done[method, channel, rank] = one
    return done


def _strongest(result: TopActivations, count: int | None) -> list[int]:
    """The ``count`` channels with the strongest top activation, in channel order (all when
    ``count`` is ``None``); ties go to the smaller channel."""
    channels = int(result.values.shape[0])
    if count is None or count >= channels:
        return list(range(channels))
    order = torch.argsort(-result.values[:, 0].double(), stable=True)
    return sorted(int(c) for c in order[:count])
