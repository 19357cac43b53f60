"""The study's three experiments as plain functions over the public API.

1. :func:`compare_widths`: train ``alexnet`` and ``alexnet_half`` at each batch size of a
   :class:`~featurescope.train.presets.Preset` and keep their histories.
2. :func:`stage_maps`: one image's feature maps at each stage (``conv1``, ``conv2``, ``conv3``,
   ``fc``), for the ``grid`` and ``sum`` visualizers.
3. :func:`embed` and :func:`index_embeddings`: the last hidden layer of every image, in an
   :class:`~featurescope.EmbeddingIndex` to search by image.
4. :func:`compare_width_representations`: linear CKA between the stages of the two trained
   widths, and of each with itself.
5. :func:`channel_units`: what the trained net's channels respond to (Zeiler & Fergus): each
   channel's top images, their patches and deconvnet projections.

The examples, ``featurescope demo`` and the CLI are built from these; they add no logic of
their own.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from featurescope._torch_utils import model_device, training_mode
from featurescope.data import NO_LABEL, load_image_folders, make_synthetic_dataset, train_transform
from featurescope.data.folders import DatasetSplits
from featurescope.errors import FeaturescopeError
from featurescope.index import EmbeddingIndex
from featurescope.tap import FeatureTap
from featurescope.train import BEST, LAST, History, train
from featurescope.train.presets import Preset
from featurescope.zoo import load_checkpoint, model_metadata, model_name, resolve_preprocessing

__all__ = [
    "WidthRun",
    "channel_units",
    "compare_width_representations",
    "compare_widths",
    "draw_stage_maps",
    "embed",
    "embed_images",
    "embedding_node",
    "example_parser",
    "first_query_per_class",
    "index_embeddings",
    "open_study_data",
    "preprocess_image",
    "stage_maps",
    "train_run",
]

PathLike = str | os.PathLike[str]


def open_study_data(data: PathLike | None, preset: Preset) -> DatasetSplits:
    """Open an image folder for the study, or draw the preset's synthetic dataset.

    Without ``root/val``, a fifth of each training class is held out for validation. With
    ``preset.augment`` the training split is augmented (random crops and flips).

    Args:
        data: a folder with ``train/`` (and ``val/``, ``test/``) of class subfolders, or
            ``None`` for the bundled synthetic dataset drawn with ``preset.dataset``.
        preset: the recipe the data is for.
    """
    root = Path(data) if data is not None else make_synthetic_dataset(**_dataset_kwargs(preset))
    augment = train_transform() if preset.augment else None
    return load_image_folders(root, train_transform=augment, val_fraction=0.2)


def example_parser(description: str | None) -> argparse.ArgumentParser:
    """The options every study example takes: ``--data``, ``--preset`` and ``--out``.

    ``--out`` defaults to ``$FEATURESCOPE_EXAMPLES_OUT`` (set by the docs build) or
    ``featurescope-examples``; the examples share its ``checkpoints/`` folder, so a model
    trained by one is reused by the next.

    Example:
        >>> args = example_parser("demo").parse_args(["--preset", "study"])
        >>> args.preset, args.data
        ('study', None)
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        help="image folder with train/ (and val/, test/) of class subfolders "
        "(default: the bundled synthetic dataset)",
    )
    parser.add_argument(
        "--preset", default="quick", help="quick (CPU minutes, default) or study (150 epochs)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("FEATURESCOPE_EXAMPLES_OUT", "featurescope-examples")),
        help="output folder, shared by the examples (default: %(default)s)",
    )
    return parser


def _dataset_kwargs(preset: Preset) -> dict[str, Any]:
    return dict(preset.dataset)


@dataclass
class WidthRun:
    """One training run of the width comparison.

    Attributes:
        name: ``"<model> bs<batch size>"``, e.g. ``"alexnet_half bs8"``.
        model: the zoo name.
        batch_size: images per step.
        history: per-epoch losses and accuracies.
        checkpoint_dir: where ``best.safetensors`` and ``last.safetensors`` are, if kept.
    """

    name: str
    model: str
    batch_size: int
    history: History
    checkpoint_dir: Path | None = None

    def best_checkpoint(self) -> Path:
        """The file of the run's best model: ``best.safetensors``, else ``last.safetensors``."""
        if self.checkpoint_dir is None:
            raise FeaturescopeError(f"run {self.name!r} kept no checkpoints (no out= given)")
        best = self.checkpoint_dir / BEST
        return best if best.exists() else self.checkpoint_dir / LAST

    def load_best(self) -> nn.Module:
        """The run's best model (by validation accuracy), or its last if it had no validation."""
        return load_checkpoint(self.best_checkpoint())


def compare_widths(
    splits: DatasetSplits,
    preset: Preset,
    *,
    out: PathLike | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[WidthRun]:
    """Train every model of ``preset`` at every batch size of it, from the same seed.

    Args:
        splits: the dataset; ``splits.eval`` (validation, else test) scores each epoch.
        preset: models, batch sizes and the training recipe.
        out: keep each run's checkpoints under ``out/<model>-bs<batch size>/``; a run found
            there resumes instead of starting over.
        device: where to train.
        seed: seeds each model's initial weights and its training.
        progress: show progress bars.

    Returns:
        One :class:`WidthRun` per (model, batch size), in the preset's order.

    Example:
        >>> import tempfile
        >>> from featurescope.data import make_synthetic_dataset, load_image_folders
        >>> from featurescope.train.presets import Preset
        >>> root = make_synthetic_dataset(tempfile.mkdtemp(), train_per_class=2,
        ...                               val_per_class=1, test_per_class=0, size=32)
        >>> tiny = Preset("tiny", "one epoch", models=("alexnet_half",), batch_sizes=(5,),
        ...               epochs=1, optimizer="adam", lr_schedule={1: 1e-4})
        >>> runs = compare_widths(load_image_folders(root), tiny, progress=False)
        >>> [(run.name, run.history.epochs) for run in runs]
        [('alexnet_half bs5', 1)]
    """
    runs = []
    for architecture in preset.models:
        for batch_size in preset.batch_sizes:
            run_dir = Path(out) / f"{architecture}-bs{batch_size}" if out is not None else None
            runs.append(
                train_run(
                    splits,
                    preset,
                    architecture,
                    batch_size,
                    out=run_dir,
                    device=device,
                    seed=seed,
                    progress=progress,
                )
            )
    return runs


def train_run(
    splits: DatasetSplits,
    preset: Preset,
    model_name: str,
    batch_size: int,
    *,
    out: PathLike | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
) -> WidthRun:
    """Train one zoo model on ``splits`` with ``preset``'s recipe: one run of the comparison.

    The model is built by :meth:`Preset.build_model <featurescope.train.presets.Preset.build_model>`
    from ``seed`` and trained with :func:`featurescope.train.train`; ``out`` keeps its checkpoints, and a run
    found there resumes.
    """
    model = preset.build_model(model_name, seed=seed, class_names=splits.classes)
    history = train(
        model,
        splits.train,
        splits.eval,
        device=device,
        seed=seed,
        checkpoint_dir=out,
        progress=progress,
        **preset.train_kwargs(batch_size),
    )
    run_dir = Path(out) if out is not None else None
    return WidthRun(f"{model_name} bs{batch_size}", model_name, batch_size, history, run_dir)


def _single_image(image: torch.Tensor) -> torch.Tensor:
    if image.dim() == 3:
        return image.unsqueeze(0)
    if image.dim() == 4 and image.shape[0] == 1:
        return image
    raise FeaturescopeError(
        f"stage_maps takes one preprocessed image [3, H, W], got shape {list(image.shape)}"
    )


def stage_maps(
    model: nn.Module, image: torch.Tensor, stages: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """One image's output at each stage of a model, as ``{stage: [C, H, W] or [D] tensor}``.

    Args:
        model: a zoo model (its stages are known) or any model, with ``stages`` given.
        image: one preprocessed image, ``[3, H, W]`` (or ``[1, 3, H, W]``).
        stages: node or module names; default: the zoo entry's stages, e.g.
            ``("conv1", "conv2", "conv3", "fc")``.

    Example:
        >>> import torch, featurescope as fs
        >>> maps = stage_maps(fs.create_model("alexnet"), torch.zeros(3, 227, 227))
        >>> {stage: list(t.shape) for stage, t in maps.items()}
        {'conv1': [96, 27, 27], 'conv2': [256, 13, 13], 'conv3': [256, 6, 6], 'fc': [5]}
    """
    if stages is None:
        info = model_metadata(model)
        if info is None or not info.stage_nodes:
            raise FeaturescopeError(
                "this model has no known stages; pass stages=[...] "
                "(featurescope.get_graph_node_names(model) lists the nodes)"
            )
        stages = info.stage_nodes
    device = model_device(model)
    with training_mode(model, False), torch.inference_mode():
        outputs = FeatureTap(model, list(stages))(_single_image(image).to(device))
    return {stage: t[0].cpu() for stage, t in outputs.items()}


def embed(
    model: nn.Module,
    data: Dataset[Any],
    *,
    node: str | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    out: PathLike | None = None,
    progress: bool = True,
) -> Any:
    """Embed every image of ``data`` with a model's last hidden layer (flattened).

    Args:
        model: a zoo model (its ``embedding_node`` is known, ``fc.4`` for the AlexNets) or any
            model, with ``node`` given.
        data: a dataset of ``(image, label)``, e.g. an :class:`~featurescope.data.ImageFolder`.
        node: the graph node to embed with.
        batch_size: images per forward.
        device: where to run the model.
        out: stream the embeddings to this folder instead of memory (resumable).
        progress: show a progress bar.

    Returns:
        The :class:`~featurescope.tap.Extraction`, its features under the alias
        ``"embedding"``, with labels and paths where the dataset has them. The model is left
        in eval mode, on ``device`` when one is given.
    """
    model.eval()
    if device is not None:
        model.to(device)
    tap = FeatureTap(model, {embedding_node(model, node): "embedding"})
    return tap.extract(
        data, batch_size=batch_size, device=device, reduce="flatten", out=out, progress=progress
    )


def embedding_node(model: nn.Module, node: str | None = None) -> str:
    """``node``, or the zoo entry's embedding node (``"fc.4"`` for the AlexNets).

    Raises:
        FeaturescopeError: no node given and the model's embedding node is unknown.
    """
    if node is not None:
        return node
    meta = model_metadata(model)
    if meta is None or meta.embedding_node is None:
        raise FeaturescopeError(
            "this model has no known embedding node; pass node=... "
            "(featurescope.get_graph_node_names(model) lists the nodes)"
        )
    return meta.embedding_node


def preprocess_image(model: nn.Module, image: Any) -> torch.Tensor:
    """Read an image (a path or a PIL image) and preprocess it as ``model`` expects.

    Zoo models carry their preprocessing; other models get the study's (Resize 256,
    CenterCrop 227, ImageNet normalisation).

    Raises:
        FeaturescopeError: the file cannot be read as an image.

    Example:
        >>> import featurescope as fs
        >>> from PIL import Image
        >>> preprocess_image(fs.create_model("tv_alexnet"), Image.new("RGB", (300, 260))).shape
        torch.Size([3, 224, 224])
    """
    from PIL import Image

    from featurescope.data.folders import as_rgb, load_rgb

    if isinstance(image, (str, os.PathLike)):
        try:
            image = load_rgb(image)
        except (OSError, ValueError) as exc:
            raise FeaturescopeError(f"cannot read image {str(image)!r}: {exc}") from exc
    elif isinstance(image, Image.Image):  # converted as a file is, as the displays convert it
        image = as_rgb(image)
    preprocessing = resolve_preprocessing(model)
    tensor: torch.Tensor = preprocessing.transform()(image)
    return tensor


def embed_images(
    model: nn.Module, images: Sequence[Any], *, node: str | None = None
) -> torch.Tensor:
    """Embed a few images (file paths or PIL images) with the model's preprocessing.

    For query images; use :func:`embed` for whole datasets.

    Returns:
        ``[len(images), dim]`` float32 embeddings on the CPU.

    Raises:
        FeaturescopeError: an image cannot be read.

    Example:
        >>> import featurescope as fs
        >>> from PIL import Image
        >>> vectors = embed_images(fs.create_model("alexnet"), [Image.new("RGB", (300, 300))])
        >>> tuple(vectors.shape)
        (1, 2048)
    """
    pictures = [preprocess_image(model, image) for image in images]
    node = embedding_node(model, node)
    with training_mode(model, False), torch.inference_mode():
        batch = torch.stack(pictures).to(model_device(model))
        vectors: torch.Tensor = FeatureTap(model, [node])(batch)[node]
    return vectors.flatten(1).float().cpu()


def first_query_per_class(labels: Sequence[int] | torch.Tensor | Any) -> list[int]:
    """The row of the first item of each class present, in class order (classes with no item
    are skipped): the queries the study's retrieval figure shows, one per class.

    Example:
        >>> first_query_per_class([2, 0, 2, 1, 0])
        [1, 3, 0]
    """
    firsts: dict[int, int] = {}
    for row, label in enumerate(torch.as_tensor(labels).reshape(-1).tolist()):
        firsts.setdefault(int(label), row)
    return [firsts[label] for label in sorted(firsts)]


def draw_stage_maps(
    maps: dict[str, torch.Tensor], out: PathLike, *, max_channels: int | None = None
) -> dict[str, dict[str, Path]]:
    """Draw each ``[C, H, W]`` map of :func:`stage_maps` channel by channel and summed.

    Writes ``<stage>_grid.png`` (every channel, or the ``max_channels`` strongest) and
    ``<stage>_sum.png`` (summed over channels) into ``out``; non-map outputs (``fc``'s class
    scores) are skipped.

    Returns:
        ``{stage: {"grid": path, "sum": path}}`` for the stages drawn.
    """
    from featurescope.visualizers import save, visualize

    folder = Path(out)
    written: dict[str, dict[str, Path]] = {}
    for stage, tensor in maps.items():
        if tensor.dim() != 3:
            continue
        title = f"{stage} {list(tensor.shape)}"
        panel = 0.9 if tensor.shape[0] <= 96 else 0.6
        grid = visualize(
            "grid",
            tensor,
            max_channels=max_channels,
            title=f"{title}, per channel",
            panel_size=panel,
        )
        summed = visualize("sum", tensor, title=f"{title}, summed over channels")
        written[stage] = {
            "grid": save(grid, folder / f"{stage}_grid.png"),
            "sum": save(summed, folder / f"{stage}_sum.png"),
        }
    return written


def index_embeddings(
    extraction: Any, alias: str = "embedding", *, metric: str = "l2"
) -> EmbeddingIndex:
    """An :class:`~featurescope.EmbeddingIndex` of an extraction's vectors, with their sample
    ids as ids, labels as labels and file paths as metadata, searched by ``metric``.

    Example:
        >>> import torch, featurescope as fs
        >>> from torch.utils.data import TensorDataset
        >>> images = TensorDataset(torch.rand(4, 3, 227, 227), torch.tensor([0, 1, 0, 1]))
        >>> index = index_embeddings(embed(fs.create_model("alexnet"), images, progress=False))
        >>> len(index), index.dim
        (4, 2048)
    """
    vectors = torch.as_tensor(extraction[alias]).flatten(1)
    index = EmbeddingIndex(vectors.shape[1], metric=metric)
    index.add(
        vectors,
        ids=torch.as_tensor(extraction.sample_ids),
        labels=_labels_or_none(extraction.labels),
        metadata=extraction.paths,
    )
    return index


def _labels_or_none(labels: Any) -> torch.Tensor | None:
    """The extraction's labels, or ``None`` for a folder without classes (every label -1)."""
    if labels is None:
        return None
    tensor = torch.as_tensor(labels)
    return None if bool((tensor == NO_LABEL).all()) else tensor


class _TwoWidths(nn.Module):
    """Both widths as one module, so that one pass over the images gives all three comparisons."""

    def __init__(self, full: nn.Module, half: nn.Module) -> None:
        super().__init__()
        self.full_width = full
        self.half_width = half

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.full_width(x), self.half_width(x)


def compare_width_representations(
    full: nn.Module,
    half: nn.Module,
    images: Dataset[Any],
    out: PathLike,
    *,
    stages: Sequence[str] = ("conv1", "conv2", "conv3", "fc"),
    batch_size: int = 16,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Linear CKA between the stages of two models, and of each with itself, written to ``out``.

    Each model runs once over ``images``. The features are flattened and every cell uses the
    unbiased minibatch estimator: over the few hundred images of a demo the full-dataset
    estimate of layers this wide would sit near its offset ``p / (n + p)`` whatever the
    networks learnt (see :func:`featurescope.compare`).

    Returns:
        ``{"num_images", "batch_size", "stages", "comparisons": [{"name", "model_a",
        "model_b", "matrix", "estimators", "figure", "page"}]}``, paths relative to
        ``out``'s parent.
    """
    from featurescope.compare import compare, write_comparison

    names = (model_name(full), model_name(half))
    nodes = [f"{side}.{stage}" for side in ("full_width", "half_width") for stage in stages]
    pair = _TwoWidths(full, half)
    if device is not None:
        pair.to(device)
    both = compare(
        pair,
        pair,
        images,
        nodes_a=nodes,
        nodes_b=nodes,
        estimator="minibatch",
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    k = len(stages)
    blocks = {
        f"{names[0]}_vs_{names[1]}": (0, k),
        f"{names[0]}_vs_{names[0]}": (0, 0),
        f"{names[1]}_vs_{names[1]}": (k, k),
    }
    comparisons = []
    folder = Path(out)
    for key, (row, col) in blocks.items():
        block = dataclasses.replace(
            both,
            matrix=both.matrix[row : row + k, col : col + k].clone(),
            estimators=tuple(r[col : col + k] for r in both.estimators[row : row + k]),
            nodes_a=tuple(stages),
            nodes_b=tuple(stages),
            model_a=names[row // k],
            model_b=names[col // k],
        )
        paths = write_comparison(block, folder / key)
        comparisons.append(
            {
                "name": f"{block.model_a} vs {block.model_b}",
                **{f: block.to_dict()[f] for f in ("model_a", "model_b", "matrix", "estimators")},
                "figure": str(paths["figure"].relative_to(folder.parent)),
                "page": str(paths["page"].relative_to(folder.parent)),
            }
        )
    return {
        "num_images": both.num_images,
        "batch_size": both.batch_size,
        "num_batches": both.num_batches,
        "stages": list(stages),
        "comparisons": comparisons,
    }


#: The stages whose channels the demo's fourth experiment shows (Zeiler & Fergus's first three).
UNIT_STAGES = ("conv1", "conv2", "conv3")


def channel_units(
    model: nn.Module,
    images: Dataset[Any],
    out: PathLike,
    *,
    stages: Sequence[str] = UNIT_STAGES,
    k: int = 9,
    shown_channels: int = 8,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """What each channel of ``stages`` responds to over ``images``, written to ``out``.

    Every channel's ``k`` strongest images and their receptive-field patches; deconvnet
    projections (Zeiler & Fergus) for the ``shown_channels`` strongest channels of each stage,
    which each stage's figure draws (see :func:`featurescope.units.write_units`).

    Returns:
        ``{"num_images", "k", "projection", "stages", "shown_channels", "units", "figures":
        {stage: path}}``, paths relative to ``out``'s parent (``units`` is ``units.json``).

    Example:
        >>> import tempfile, torch, featurescope as fs
        >>> from torch.utils.data import TensorDataset
        >>> images = TensorDataset(torch.rand(3, 3, 227, 227))
        >>> out = Path(tempfile.mkdtemp()) / "units"
        >>> done = channel_units(fs.create_model("alexnet_half"), images, out, stages=["conv1"],
        ...                      k=2, shown_channels=2, progress=False)
        >>> done["figures"], done["units"]
        ({'conv1': 'units/conv1.png'}, 'units/units.json')
    """
    from featurescope.units import UNITS_FILE, write_units

    if device is not None:
        model.to(device)
    folder = Path(out)
    units = write_units(
        model,
        images,
        list(stages),
        folder,
        k=k,
        projection="deconvnet",
        figure_channels=shown_channels,
        file_channels=shown_channels,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    figures = {
        node["node"]: str((folder / node["figure"]).relative_to(folder.parent))
        for node in units["nodes"]
        if node["figure"]
    }
    return {
        "num_images": units["num_images"],
        "k": k,
        "projection": units["projection"],
        "stages": list(stages),
        "shown_channels": shown_channels,
        "units": str((folder / UNITS_FILE).relative_to(folder.parent)),
        "figures": figures,
    }
