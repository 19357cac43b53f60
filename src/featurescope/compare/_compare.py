"""``compare``: one pass of each model over the same batches, into the sums of both estimators."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from featurescope._torch_utils import model_device, training_mode, weights_fingerprint
from featurescope.compare._cells import ESTIMATORS, Cells, choose_estimators
from featurescope.compare._checkpoint import Checkpoint
from featurescope.compare._plan import REDUCTIONS, dist_info, plan_batches, split_inputs
from featurescope.compare._result import Comparison
from featurescope.errors import FeaturescopeError, FeaturescopeWarning, did_you_mean
from featurescope.tap import FeatureTap
from featurescope.zoo import model_metadata, model_name

__all__ = ["compare"]

Nodes = Sequence[str] | Mapping[str, str]


def _requested(model: nn.Module, nodes: Nodes | None, argument: str) -> dict[str, str]:
    """``{node: label}``; by default the zoo model's stage nodes."""
    if nodes is None:
        meta = model_metadata(model)
        if meta is None or not meta.stage_nodes:
            raise FeaturescopeError(
                f"{argument} is needed for a {type(model).__name__}, which is not a zoo model "
                "with stage nodes: name its nodes, e.g. ['layer1', 'layer2'] "
                "(featurescope.get_graph_node_names(model) lists them)"
            )
        nodes = meta.stage_nodes
    if isinstance(nodes, str):
        nodes = [nodes]
    pairs = list(nodes.items()) if isinstance(nodes, Mapping) else [(n, n) for n in nodes]
    if not pairs:
        raise FeaturescopeError(f"{argument} is empty; name at least one node")
    labels = [label for _, label in pairs]
    if len(set(labels)) < len(labels) or len({n for n, _ in pairs}) < len(pairs):
        raise FeaturescopeError(f"{argument} names a node (or gives a label) twice: {pairs}")
    return dict(pairs)


class _Taps:
    """One tap per distinct model: a model compared with itself runs once per batch."""

    def __init__(
        self, model_a: nn.Module, nodes_a: list[str], model_b: nn.Module, nodes_b: list[str]
    ):
        self.same = model_a is model_b
        union_a = list(dict.fromkeys([*nodes_a, *nodes_b])) if self.same else nodes_a
        self.tap_a = FeatureTap(model_a, {n: n for n in union_a})
        self.tap_b = self.tap_a if self.same else FeatureTap(model_b, {n: n for n in nodes_b})
        self.nodes_a, self.nodes_b = nodes_a, nodes_b

    def __call__(self, inputs: Any, reduce: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        out_a = self.tap_a(inputs)
        out_b = out_a if self.same else self.tap_b(inputs)
        xs = [_rows(out_a[n], n, "A", reduce) for n in self.nodes_a]
        ys = [_rows(out_b[n], n, "B", reduce) for n in self.nodes_b]
        return xs, ys


def _rows(value: Any, node: str, side: str, reduce: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        raise FeaturescopeError(
            f"node {node!r} of model {side} gives "
            f"{type(value).__name__ if not isinstance(value, torch.Tensor) else list(value.shape)}"
            ", not a batch of features [N, ...]; choose a node whose output is a tensor"
        )
    return REDUCTIONS[reduce](value.detach()).to(torch.float64)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist_info()[1] == 1:
        return t
    total = t.detach().clone().contiguous()
    torch.distributed.all_reduce(total)
    return total


def _check_options(reduce: str, estimator: str, max_exact_features: int) -> None:
    if reduce not in REDUCTIONS:
        raise FeaturescopeError(
            f"unknown reduce {reduce!r}.{did_you_mean(str(reduce), REDUCTIONS)} Use "
            f"{' or '.join(map(repr, REDUCTIONS))}."
        )
    if estimator not in ESTIMATORS:
        raise FeaturescopeError(
            f"unknown estimator {estimator!r}.{did_you_mean(str(estimator), ESTIMATORS)} Use "
            f"{', '.join(map(repr, ESTIMATORS))}."
        )
    if isinstance(max_exact_features, bool) or not isinstance(max_exact_features, int):
        raise FeaturescopeError(
            f"max_exact_features must be an integer, got {max_exact_features!r}"
        )
    if max_exact_features < 1:
        raise FeaturescopeError(f"max_exact_features must be positive, got {max_exact_features}")


def _device(models: Sequence[nn.Module], device: str | torch.device | None) -> torch.device:
    on = [d for d in (model_device(m) for m in models) if d is not None]
    target = torch.device(device) if device is not None else (on[0] if on else torch.device("cpu"))
    for d in on:
        if d.type != target.type or (d.index is not None and target.index not in (None, d.index)):
            raise FeaturescopeError(
                f"a model is on {d}, not on {target}; move both models first: "
                f"model.to({str(target)!r})"
            )
    return target


def compare(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Dataset[Any] | DataLoader[Any],
    *,
    nodes_a: Nodes | None = None,
    nodes_b: Nodes | None = None,
    reduce: str = "flatten",
    estimator: str = "auto",
    max_exact_features: int = 4096,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    num_workers: int = 0,
    progress: bool = True,
) -> Comparison:
    """Linear CKA between every node of ``model_a`` and every node of ``model_b`` over ``data``.

    Both models see the same images in the same batches, once each, in eval mode (each
    submodule's mode is restored afterwards) and in inference mode. Each node's output becomes
    one row per image (``reduce``), in float64, and adds to the sums of its cells' estimator:

    - ``"exact"``: the whole dataset's linear CKA (Kornblith et al. 2019), streamed through
      centred ``XᵀX``, ``YᵀY`` and ``XᵀY``: memory independent of the number of images,
      equal to the full-batch formula to float64 rounding. Like every full-batch estimate it
      is biased upward for small samples: two independent representations of width ``p`` over
      ``n`` images score about ``p / (n + p)``, not 0.
    - ``"minibatch"``: the unbiased HSIC₁ of Song et al. averaged over the batches (Nguyen et
      al. 2021): memory ``batch_size²`` per node, no offset, and a value that depends on which
      images share a batch (so the batches are fixed, shared by both models and every rank).

    Under ``torch.distributed`` each rank takes whole batches (``r, r + world, ...``) and the
    sums are all-reduced, so one rank or several give the same matrix to float64 rounding;
    every rank returns it.

    Args:
        model_a: the first model (rows); may be ``model_b`` itself.
        model_b: the second model (columns).
        data: a map-style dataset of images (or ``(image, label, ...)``), or a batched
            DataLoader over one (its sampler's order is drawn once, its batch size used).
            Both models get the same input tensors.
        nodes_a: model A's nodes, as :class:`~featurescope.FeatureTap` takes them (a list, or
            ``{node: label}``); default the zoo model's stage nodes.
        nodes_b: model B's.
        reduce: ``"flatten"`` (every value of a node's output) or ``"avgpool"`` (the mean
            over the spatial positions: one value per channel).
        estimator: ``"auto"``: exact where both widths are at most ``max_exact_features``
            and there are enough images for the exact estimate's offset to be under 1 %
            (about 100 images per feature; see
            :func:`featurescope.compare.choose_estimators`), minibatch elsewhere; or
            ``"exact"`` / ``"minibatch"`` for every cell.
        max_exact_features: the widest node ``"auto"`` computes exactly.
        batch_size: images per batch, at least 4 (ignored for a DataLoader).
        device: where the models run and the sums live; default the models' device.
        out: a folder to keep the running sums in; the same call resumes an interrupted
            comparison from it (each rank in ``out/rank{r}``).
        overwrite: with ``out``, start afresh even if the folder holds a comparison.
        num_workers: DataLoader workers for a dataset.
        progress: show a progress bar (on rank 0).

    Returns:
        A :class:`~featurescope.compare.Comparison` with the matrix, each cell's estimator and the
        number of images.

    Raises:
        FeaturescopeError: an unknown option, a batch size under 4, fewer than 2 images, a
            node whose output is not a tensor batch, models on another device, or ``out``
            holding another comparison.
        NodeNotFoundError: a node is not in its model.

    Example:
        >>> import torch, featurescope as fs
        >>> from torch.utils.data import TensorDataset
        >>> net = fs.create_model("alexnet_half").eval()
        >>> images = TensorDataset(torch.randn(8, 3, 227, 227))
        >>> same = fs.compare(net, net, images, nodes_a=["conv3", "fc"], nodes_b=["conv3", "fc"],
        ...                   reduce="avgpool", batch_size=4, progress=False)
        >>> [round(same["conv3", "conv3"], 6), round(same["fc", "fc"], 6)]
        [1.0, 1.0]
        >>> same.estimators[0], same.num_images  # 8 images: too few for an exact estimate
        (('minibatch', 'minibatch'), 8)
    """
    _check_options(reduce, estimator, max_exact_features)
    want_a = _requested(model_a, nodes_a, "nodes_a")
    want_b = _requested(model_b, nodes_b, "nodes_b")
    taps = _Taps(model_a, list(want_a), model_b, list(want_b))
    target = _device([model_a, model_b], device)
    rank, world = dist_info()
    plan = plan_batches(data, batch_size, num_workers, rank, world)
    checkpoint = None
    if out is not None:
        folder = Path(out) / f"rank{rank}" if world > 1 else Path(out)
        header = {
            "model_a": model_name(model_a),
            "model_b": model_name(model_b),
            "weights_a": weights_fingerprint(model_a),
            "weights_b": weights_fingerprint(model_b),
            "nodes_a": want_a,
            "nodes_b": want_b,
            "reduce": reduce,
            "estimator": estimator,
            "max_exact_features": max_exact_features,
            "batch_size": plan.batch_size,
            "rank": rank,
            "world_size": world,
        }
        checkpoint = Checkpoint(folder, header, plan.order, overwrite)
        plan.order = checkpoint.order
    done, cells = checkpoint.restore(target) if checkpoint else (0, None)
    mine = plan.rank_batches(rank, world)
    cells = _run(
        taps,
        plan.loader(mine[done:]),
        target,
        reduce,
        cells,
        checkpoint,
        done,
        mine,
        len(plan.order),
        estimator,
        max_exact_features,
        progress and rank == 0,
    )
    if world > 1:
        cells = _same_cells_everywhere(cells, target)
    assert cells is not None  # rank 0 always has a batch
    cells.combine(_all_reduce)
    matrix = cells.matrix()
    labels_a, labels_b = tuple(want_a.values()), tuple(want_b.values())
    _warn_undefined(cells, labels_a, labels_b)
    return Comparison(
        matrix=matrix,
        estimators=cells.estimators,
        num_images=len(plan.order),
        nodes_a=labels_a,
        nodes_b=labels_b,
        model_a=model_name(model_a),
        model_b=model_name(model_b),
        reduce=reduce,
        batch_size=plan.batch_size,
        num_batches=len(plan.batches),
    )


def _run(
    taps: _Taps,
    loader: DataLoader[Any],
    device: torch.device,
    reduce: str,
    cells: Cells | None,
    checkpoint: Checkpoint | None,
    done: int,
    mine: list[Any],
    num_images: int,
    estimator: str,
    max_exact_features: int,
    progress: bool,
) -> Cells | None:
    from featurescope._progress import progress as progress_bar

    total = sum(len(b) for b in mine)
    initial = sum(len(b) for b in mine[:done])
    with ExitStack() as stack:
        for model in dict.fromkeys([taps.tap_a.model, taps.tap_b.model]):
            stack.enter_context(training_mode(model, False))
        stack.enter_context(torch.inference_mode())
        bar = stack.enter_context(
            progress_bar(total, "compare", unit="img", initial=initial, enabled=progress)
        )
        for batch in loader:
            inputs = split_inputs(batch)
            if isinstance(inputs, torch.Tensor):
                inputs = inputs.to(device, non_blocking=device.type == "cuda")
            xs, ys = taps(inputs, reduce)
            if cells is None:
                widths_a = [x.shape[1] for x in xs]
                widths_b = [y.shape[1] for y in ys]
                chosen = choose_estimators(
                    widths_a, widths_b, num_images, estimator, max_exact_features
                )
                cells = Cells.create(widths_a, widths_b, chosen, device)
            cells.update(xs, ys)
            done += 1
            if checkpoint is not None:
                checkpoint.save_if_cheap(done, cells)
            bar.update(len(xs[0]))
    if checkpoint is not None and cells is not None:
        checkpoint.save(done, cells)
    return cells


def _same_cells_everywhere(cells: Cells | None, device: torch.device) -> Cells:
    """A rank that had no batch (more ranks than batches) still joins the all-reduce."""
    specs: list[Any] = [None] * dist_info()[1]
    torch.distributed.all_gather_object(specs, cells.spec() if cells is not None else None)
    if cells is not None:
        return cells
    spec = next(s for s in specs if s is not None)
    return Cells.create(spec["widths_a"], spec["widths_b"], spec["estimators"], device)


def _warn_undefined(cells: Cells, labels_a: Sequence[str], labels_b: Sequence[str]) -> None:
    undefined = cells.undefined()
    if undefined:
        names = ", ".join(f"({labels_a[i]}, {labels_b[j]})" for i, j in undefined[:5])
        warnings.warn(
            f"CKA is undefined (NaN) for {len(undefined)} cell(s), {names}: a node's features "
            "are constant over these images (a dead layer?), or, for the minibatch estimator, "
            "its HSIC with itself is not positive (use larger batches)",
            FeaturescopeWarning,
            stacklevel=3,
        )
