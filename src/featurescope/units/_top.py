"""Each channel's strongest activations over a dataset, kept in O(channels x k) memory.

Zeiler & Fergus showed, for each channel, the nine dataset images that excite it most. Here
every batch's per-image score of each channel (its maximum over positions, or its mean) joins
the running top ``k``, sorted by value (descending), then image index, then position, so the
answer is the same whatever the batch size or the order of merging.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from featurescope.errors import FeaturescopeError
from featurescope.tap import FeatureTap, fold

__all__ = ["TopActivations", "merge_top_activations", "top_activations"]

Reduce = Literal["max", "mean"]


@dataclass(frozen=True)
class TopActivations:
    """A node's ``k`` strongest activations per channel, strongest first.

    Attributes:
        node: the node's name.
        values: ``[C, k]`` the activations (``-inf`` where fewer than ``k`` images were seen).
        image_ids: ``[C, k]`` indices into the dataset (``-1`` where unfilled).
        positions: ``[C, k, 2]`` the ``(row, column)`` of the activation on the node's grid:
            the strongest position, also under ``reduce="mean"``.
        grid: the node's ``(height, width)``; tokens (``[N, T, D]``) are laid on their square
            grid, a class token left out; ``(1, 1)`` for a vector.
        reduce: ``"max"`` or ``"mean"``: how an image's map scores it.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Identity())
        >>> top = top_activations(model, torch.rand(5, 3, 4, 4), ["0"], k=2)["0"]
        >>> top.values.shape, top.image_ids.shape, top.positions.shape, top.grid
        (torch.Size([3, 2]), torch.Size([3, 2]), torch.Size([3, 2, 2]), (4, 4))
    """

    node: str
    values: torch.Tensor
    image_ids: torch.Tensor
    positions: torch.Tensor
    grid: tuple[int, int]
    reduce: str


def as_grid(value: torch.Tensor) -> torch.Tensor:
    """A node's batch as ``[N, C, H, W]``: maps as they are, tokens on their square grid.

    Example:
        >>> import torch
        >>> as_grid(torch.zeros(2, 1 + 16, 8)).shape  # ViT: a class token and 4x4 patches
        torch.Size([2, 8, 4, 4])
    """
    if value.ndim == 4:
        return value
    if value.ndim == 2:
        return value[:, :, None, None]
    if value.ndim == 3:
        tokens = value.shape[1]
        for skip in (0, 1):  # a class token first, or none
            side = math.isqrt(tokens - skip)
            if side * side == tokens - skip and side > 0:
                grid = value[:, skip:, :].transpose(1, 2)
                return grid.reshape(value.shape[0], value.shape[2], side, side)
    raise FeaturescopeError(
        f"a node of shape {tuple(value.shape)} has no grid of positions: top_activations takes "
        "maps [N, C, H, W], tokens [N, T, D] on a square grid, or vectors [N, C]"
    )


def _merge(
    values: torch.Tensor, ids: torch.Tensor, flat: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the first ``k`` of each row by (value descending, image, position): two stable sorts."""
    order = torch.argsort(flat, dim=1, stable=True)
    order = order.gather(1, torch.argsort(ids.gather(1, order), dim=1, stable=True))
    vals = values.gather(1, order)
    order = order.gather(1, torch.argsort(-vals, dim=1, stable=True))[:, :k]
    return values.gather(1, order), ids.gather(1, order), flat.gather(1, order)


class _Running:
    """One node's running top ``k`` per channel."""

    def __init__(self, channels: int, k: int, grid: tuple[int, int], dtype: torch.dtype) -> None:
        self.k = k
        self.grid = grid
        self.dtype = dtype
        self.values = torch.full((channels, 0), -math.inf, dtype=torch.float64)
        self.ids = torch.zeros((channels, 0), dtype=torch.int64)
        self.flat = torch.zeros((channels, 0), dtype=torch.int64)

    def add(self, maps: torch.Tensor, ids: torch.Tensor, reduce: Reduce) -> None:
        n, c = maps.shape[:2]
        flat_maps = maps.reshape(n, c, -1).double()
        best = flat_maps.argmax(dim=2)  # the first of equal maxima: the smallest position
        score = flat_maps.amax(dim=2) if reduce == "max" else flat_maps.mean(dim=2)
        self.join(score.T.cpu(), ids[None, :].expand(c, n), best.T.cpu())

    def join(self, values: torch.Tensor, ids: torch.Tensor, flat: torch.Tensor) -> None:
        """Keep the top ``k`` of what is kept and ``[C, m]`` more candidates."""
        self.values, self.ids, self.flat = _merge(
            torch.cat([self.values, values], 1),
            torch.cat([self.ids, ids], 1),
            torch.cat([self.flat, flat], 1),
            self.k,
        )

    def result(self, node: str, reduce: str) -> TopActivations:
        c, have = self.values.shape
        pad = self.k - have
        values = torch.cat([self.values, torch.full((c, pad), -math.inf, dtype=torch.float64)], 1)
        ids = torch.cat([self.ids, torch.full((c, pad), -1, dtype=torch.int64)], 1)
        flat = torch.cat([self.flat, torch.zeros((c, pad), dtype=torch.int64)], 1)
        width = self.grid[1]
        positions = torch.stack([flat // width, flat % width], dim=2)
        positions[ids < 0] = -1
        return TopActivations(node, values.to(self.dtype), ids, positions, self.grid, reduce)


class _TopK:
    """Each node's running top ``k``: an accumulator for :func:`featurescope.tap.fold`."""

    def __init__(self, nodes: Sequence[str], k: int, reduce: Reduce) -> None:
        self.nodes = list(nodes)
        self.k = k
        self.reduce = reduce
        self.running: dict[str, _Running] = {}

    def config(self) -> dict[str, Any]:
        return {"kind": "top_activations", "k": self.k, "reduce": self.reduce}

    def update(self, features: Mapping[str, torch.Tensor], ids: torch.Tensor) -> None:
        ids = ids.cpu()
        for node in self.nodes:
            maps = as_grid(features[node])
            if node not in self.running:
                grid = (int(maps.shape[2]), int(maps.shape[3]))
                self.running[node] = _Running(int(maps.shape[1]), self.k, grid, maps.dtype)
            self.running[node].add(maps, ids, self.reduce)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for i, node in enumerate(self.nodes):
            run = self.running.get(node)
            if run is not None:
                state[f"{i}.values"] = run.values
                state[f"{i}.ids"] = run.ids
                state[f"{i}.flat"] = run.flat
                state[f"{i}.grid"] = torch.tensor(run.grid, dtype=torch.int64)
                state[f"{i}.dtype"] = torch.zeros(0, dtype=run.dtype)  # the maps' dtype, no data
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.running = {}
        self.merge([state])

    def merge(self, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        for state in states:
            for i, node in enumerate(self.nodes):
                if f"{i}.values" not in state:
                    continue  # a rank that saw no image
                values = state[f"{i}.values"]
                if node not in self.running:
                    grid = (int(state[f"{i}.grid"][0]), int(state[f"{i}.grid"][1]))
                    dtype = state[f"{i}.dtype"].dtype
                    self.running[node] = _Running(values.shape[0], self.k, grid, dtype)
                self.running[node].join(values, state[f"{i}.ids"], state[f"{i}.flat"])

    def result(self) -> dict[str, TopActivations]:
        return {node: self.running[node].result(node, self.reduce) for node in self.nodes}


def top_activations(
    model: nn.Module,
    data: Dataset[Any] | DataLoader[Any] | torch.Tensor,
    nodes: Sequence[str],
    k: int = 9,
    *,
    reduce: Reduce = "max",
    batch_size: int = 64,
    device: str | torch.device | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    num_workers: int = 0,
) -> dict[str, TopActivations]:
    """Stream ``data`` through ``model`` and keep each channel's ``k`` strongest images.

    Runs on the extraction machinery (:func:`featurescope.tap.fold`): with ``out`` the running
    top ``k`` is saved as it goes and the same call resumes a killed run from there (a state
    made over other data, weights, nodes, ``k`` or ``reduce`` is refused); under
    ``torch.distributed`` (e.g. ``torchrun``) each rank ranks its ``DistributedSampler`` part
    and the parts are merged exactly, so every rank returns what one process would. Memory is
    O(channels x ``k``) whatever the dataset's size.

    Args:
        model: any model :class:`~featurescope.FeatureTap` runs (run in eval mode; each
            submodule's mode is restored afterwards).
        data: a map-style dataset of images (or ``(image, label)`` pairs), a batched
            DataLoader over one, or a tensor ``[N, C, H, W]``; image ids are indices into it.
        nodes: the nodes to rank, as :class:`~featurescope.FeatureTap` names them.
        k: how many images to keep per channel.
        reduce: ``"max"`` scores an image by its strongest position (Zeiler & Fergus),
            ``"mean"`` by the spatial mean.
        batch_size: images per forward pass (for a dataset or a tensor).
        device: where to run (the model must already be there); default: the model's device.
        out: a folder to keep the running top ``k`` in (``out/rank{r}`` per rank), and to
            resume from.
        overwrite: with ``out``, start afresh even if the folder holds a saved state.
        progress: show a progress bar (on rank 0).
        num_workers: DataLoader workers for a dataset.

    Returns:
        ``{node: TopActivations}``; ties are broken by image index, then position.

    Raises:
        FeaturescopeError: ``k`` or ``reduce`` is invalid, a node has no grid, the data holds
            no images, or ``out`` holds the state of another run.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        >>> images = torch.arange(12.0).view(3, 1, 2, 2)  # image 2 is the brightest
        >>> top = top_activations(model, images, ["0"], k=2)["0"]
        >>> top.image_ids.tolist(), top.positions[0, 0].tolist(), (top.values[1] + 0).tolist()
        ([[2, 1], [0, 1]], [1, 1], [0.0, -4.0])
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise FeaturescopeError(f"k must be a positive integer, got {k!r}")
    if reduce not in ("max", "mean"):
        raise FeaturescopeError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    nodes = [nodes] if isinstance(nodes, str) else list(nodes)
    if not nodes:
        raise FeaturescopeError("nodes is empty; name at least one node to rank")
    if isinstance(data, torch.Tensor):
        if len(data) == 0:
            raise FeaturescopeError("the data holds no images")
        data = TensorDataset(data)
    accumulator = _TopK(nodes, k, reduce)
    fold(
        FeatureTap(model, nodes),
        data,
        accumulator,
        batch_size=batch_size,
        device=device,
        out=out,
        overwrite=overwrite,
        progress=progress,
        num_workers=num_workers,
        desc="top activations",
    )
    return accumulator.result()


def merge_top_activations(
    parts: Sequence[Mapping[str, TopActivations]], k: int | None = None
) -> dict[str, TopActivations]:
    """One exact top ``k`` from several partial ones (shards of a dataset with global image ids).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Identity())
        >>> images = torch.rand(6, 2, 3, 3)
        >>> whole = top_activations(model, images, ["0"], k=3)
        >>> a, b = (top_activations(model, images[s], ["0"], k=3) for s in (slice(0, 4), slice(4, 6)))
        >>> b = {"0": TopActivations("0", b["0"].values, b["0"].image_ids + 4, b["0"].positions, (3, 3), "max")}
        >>> merged = merge_top_activations([a, b])["0"]
        >>> torch.equal(merged.image_ids, whole["0"].image_ids)
        True
    """
    if not parts:
        raise FeaturescopeError("merge_top_activations needs at least one part")
    merged: dict[str, TopActivations] = {}
    for node, first in parts[0].items():
        group = [p[node] for p in parts]
        keep = k or first.values.shape[1]
        width = first.grid[1]
        values = torch.cat([g.values.double() for g in group], 1)
        ids = torch.cat([g.image_ids for g in group], 1)
        flat = torch.cat([g.positions[..., 0] * width + g.positions[..., 1] for g in group], 1)
        ids = torch.where(ids < 0, torch.iinfo(torch.int64).max, ids)  # unfilled slots last
        values, ids, flat = _merge(values, ids, flat, keep)
        missing = ids == torch.iinfo(torch.int64).max
        ids = torch.where(missing, -1, ids)
        positions = torch.stack([flat // width, flat % width], dim=2)
        positions[missing] = -1
        merged[node] = TopActivations(
            node, values.to(first.values.dtype), ids, positions, first.grid, first.reduce
        )
    return merged
