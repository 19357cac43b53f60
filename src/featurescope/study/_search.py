"""Search by image as one object: a model, its embedding node and preprocessing, and an index.

:class:`ImageSearch` is what ``featurescope index build`` saves and ``index search`` and
``featurescope explore`` load: a folder (``my.fsindex/``) holding the
:class:`~featurescope.EmbeddingIndex`, the model's weights as a safetensors checkpoint (left out
when the zoo name alone rebuilds them) and ``search.json`` naming the model, the node, the
preprocessing, the images (relative to their root) and the class names. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from featurescope._io import new_dir_mode
from featurescope._torch_utils import model_device, training_mode
from featurescope.data import ImageFolder
from featurescope.data.transforms import STUDY_PREPROCESSING, Preprocessing
from featurescope.errors import FeaturescopeError, IndexFileError, InputShapeError
from featurescope.index import EmbeddingIndex, SearchResult
from featurescope.tap import FeatureTap

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ImageSearch"]

PathLike = str | os.PathLike[str]

FORMAT = "featurescope-image-search/1"
MANIFEST, INDEX, WEIGHTS = "search.json", "index.safetensors", "model.safetensors"


@dataclass(frozen=True)
class _ZooFacts:
    name: str | None
    num_classes: int | None
    class_names: list[str] | None
    preprocessing: Preprocessing | None
    embedding_node: str | None
    stages: tuple[str, ...] = ()


def _zoo_facts(model: nn.Module) -> _ZooFacts:
    """What the zoo knows of ``model``: the one place this module reads zoo metadata."""
    from featurescope.zoo import model_metadata

    meta = model_metadata(model)
    if meta is None:
        return _ZooFacts(None, None, None, None, None, ())
    names = list(meta.class_names) if meta.class_names is not None else None
    return _ZooFacts(
        name=meta.architecture,
        num_classes=meta.num_classes,
        class_names=names,
        preprocessing=meta.preprocessing,
        embedding_node=meta.embedding_node,
        stages=meta.stage_nodes,
    )


def _relative(path: str, root: Path | None) -> str:
    if root is not None:
        with contextlib.suppress(ValueError):
            return Path(path).resolve().relative_to(root).as_posix()
    return str(Path(path).resolve())


def _weights_reproducible(model: nn.Module, facts: _ZooFacts) -> bool:
    """Whether ``create_model(name)`` alone gives these weights (e.g. pretrained, fixed ones)."""
    from featurescope.zoo import create_model

    if facts.name is None:
        return False
    ours = model.state_dict()
    # Built under two different seeds: random initial weights differ between them (even where
    # the caller's seed happened to give these), weights the builder fixes do not.
    for seed in (12345, 54321):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                theirs = create_model(facts.name, num_classes=facts.num_classes).state_dict()
            except FeaturescopeError:
                return False
        if ours.keys() != theirs.keys() or not all(
            torch.equal(ours[k].detach().cpu(), theirs[k]) for k in ours
        ):
            return False
    return True


class ImageSearch:
    """Search images by image: a model's embedding of a folder, searchable by new images.

    Build one with :meth:`build`, query it with :meth:`search_images`, draw the answer with
    :meth:`montage`, keep it with :meth:`save` and reopen it with :meth:`load` (or from the
    command line: ``featurescope index build|search`` write and read the same folders).

    Args:
        model: the network that embeds images.
        index: the embeddings of the gallery; its metadata are the images' paths.
        node: the graph node whose output is the embedding (default: the zoo's, ``fc.4`` for
            the AlexNets).
        preprocessing: how images are prepared (default: the zoo model's, else the study's).
        root: the folder the gallery images were read from; saved paths are relative to it.
        class_names: names of the index's integer labels.

    Raises:
        FeaturescopeError: no ``node`` given and the zoo knows no embedding node of the model.

    Example:
        >>> import pathlib, tempfile, featurescope as fs
        >>> from PIL import Image
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> for name, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
        ...     (root / name).mkdir()
        ...     for i in range(2):
        ...         Image.new("RGB", (64, 64), colour).save(root / name / f"{i}.png")
        >>> search = fs.ImageSearch.build(fs.create_model("alexnet_half"), root, progress=False)
        >>> result = search.search_images([root / "blue" / "0.png"], k=2)
        >>> sorted(search.class_names[label] for label in result.labels[0].tolist())
        ['blue', 'blue']
        >>> again = fs.ImageSearch.load(search.save(root.parent / "colours.fsindex"))
        >>> again.search_images([root / "blue" / "0.png"], k=2).ids.tolist() == result.ids.tolist()
        True
    """

    def __init__(
        self,
        model: nn.Module,
        index: EmbeddingIndex,
        *,
        node: str | None = None,
        preprocessing: Preprocessing | None = None,
        root: PathLike | None = None,
        class_names: Sequence[str] | None = None,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        #: ``(path, reason)`` of each file in the folder that was not an image or did not decode.
        self.skipped: list[tuple[str, str]] = [(str(p), str(why)) for p, why in skipped]
        facts = _zoo_facts(model)
        node = node or facts.embedding_node
        if node is None:
            raise FeaturescopeError(
                "this model has no known embedding node; pass node=... "
                "(featurescope.get_graph_node_names(model) lists the nodes)"
            )
        self.model = model
        self.index = index
        self.node: str = node
        self.preprocessing: Preprocessing = (
            preprocessing or facts.preprocessing or STUDY_PREPROCESSING
        )
        self.root: Path | None = Path(root).resolve() if root is not None else None
        names = class_names if class_names is not None else facts.class_names
        self.class_names: list[str] | None = list(names) if names is not None else None
        self._tap: FeatureTap | None = None

    def __repr__(self) -> str:
        model = _zoo_facts(self.model).name or type(self.model).__name__
        return (
            f"ImageSearch({model}, node={self.node!r}, {len(self.index)} images, "
            f"{self.index.dim}-d, root={str(self.root) if self.root else None!r})"
        )

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model: nn.Module,
        folder: PathLike,
        *,
        node: str | None = None,
        preprocessing: Preprocessing | None = None,
        batch_size: int = 32,
        device: str | torch.device | None = None,
        progress: bool = True,
    ) -> ImageSearch:
        """Embed every image of ``folder`` with ``model`` and index them.

        Args:
            model: the network (a zoo model knows its embedding node and preprocessing).
            folder: an image folder, as :class:`~featurescope.data.ImageFolder` reads it (one
                subfolder per class), or a dataset root whose ``train/`` is one.
            node: the embedding node (default: the zoo's).
            preprocessing: default: the zoo model's, else the study's.
            batch_size: images per forward.
            device: where to run the model.
            progress: show a progress bar (plain lines when not on a terminal).

        Raises:
            EmptyDatasetError: the folder holds no readable image.
        """
        from featurescope.study._experiments import embed, index_embeddings

        facts = _zoo_facts(model)
        prep = preprocessing or facts.preprocessing or STUDY_PREPROCESSING
        root = Path(folder)
        if (root / "train").is_dir():
            root = root / "train"
        dataset = ImageFolder(root, prep.transform())
        node = node or facts.embedding_node
        extraction = embed(
            model, dataset, node=node, batch_size=batch_size, device=device, progress=progress
        )
        index = index_embeddings(extraction)
        return cls(
            model,
            index,
            node=extraction.nodes.get("embedding", node),
            preprocessing=prep,
            root=root,
            class_names=dataset.classes,
            skipped=dataset.skipped,
        )

    # -- searching ----------------------------------------------------------------------------

    def preprocess(self, images: Any) -> torch.Tensor:
        """Query images as one ``[N, 3, H, W]`` batch: paths and PIL images preprocessed,
        tensors passed through."""
        from featurescope.data.folders import load_rgb

        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                images = images.unsqueeze(0)
            if images.dim() != 4 or images.shape[1] != 3:
                raise InputShapeError(
                    "search_images takes preprocessed image tensors [3, H, W] or [N, 3, H, W], "
                    f"got shape {list(images.shape)}"
                )
            batch: torch.Tensor = images.float()
            return batch
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
            images = [images]
        if not images:
            raise FeaturescopeError("search_images needs at least one image")
        transform = self.preprocessing.transform()
        pictures = []
        for image in images:
            if isinstance(image, torch.Tensor):
                pictures.append(image.float())
                continue
            if isinstance(image, (str, os.PathLike)):
                try:
                    image = load_rgb(image)
                except (OSError, ValueError) as exc:
                    raise FeaturescopeError(f"cannot read image {str(image)!r}: {exc}") from exc
            pictures.append(transform(image))
        return torch.stack(pictures)

    def embed_images(self, images: Any) -> torch.Tensor:
        """The embeddings of query images, ``[n, dim]`` float32 on the CPU.

        Args:
            images: image paths or PIL images (preprocessed here), or preprocessed tensors
                ``[3, H, W]`` / ``[N, 3, H, W]``.
        """
        if self._tap is None:
            self._tap = FeatureTap(self.model, {self.node: "embedding"})
        batch = self.preprocess(images)
        with training_mode(self.model, False), torch.inference_mode():
            out = self._tap(batch.to(model_device(self.model) or torch.device("cpu")))
        vectors: torch.Tensor = out["embedding"].flatten(1).float().cpu()
        return vectors

    def search_images(self, images: Any, k: int = 10) -> SearchResult:
        """The ``k`` indexed images nearest to each query image, nearest first.

        Args:
            images: paths, PIL images, or preprocessed tensors (see :meth:`embed_images`).
            k: neighbours per query; at most the index's size.

        Returns:
            A :class:`~featurescope.SearchResult`; its ``metadata`` are the hits' paths.
        """
        return self.index.search(self.embed_images(images), k)

    def image_paths(self) -> dict[int, str | None]:
        """``{id: image path}`` of every indexed image (``None`` where it has none)."""
        return dict(zip(self.index.ids.tolist(), self.index.metadata, strict=True))

    def labels(self) -> dict[int, int]:
        """``{id: label}`` of every indexed image (``-1`` where unlabelled)."""
        return dict(zip(self.index.ids.tolist(), self.index.labels.tolist(), strict=True))

    def montage(self, images: Any, k: int = 10, *, title: str | None = None) -> Figure:
        """Draw each query image beside its ``k`` nearest indexed images (the ``montage``
        visualizer), captioned with distances and class names."""
        from featurescope.visualizers import visualize

        result = self.search_images(images, k)
        queries: Any = images
        if isinstance(images, torch.Tensor):
            queries = self.preprocessing.denormalize(self.preprocess(images))
        elif isinstance(images, (str, os.PathLike)):
            queries = [images]
        return visualize(
            "montage",
            result,
            images=self.image_paths(),
            queries=queries,
            labels=self.labels(),
            class_names=self.class_names,
            title=title or f"{result.ids.shape[1]} nearest images",
        )

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: PathLike) -> Path:
        """Write this search to the folder ``path`` (e.g. ``photos.fsindex``), atomically.

        The folder is assembled beside ``path`` and renamed into place, replacing an earlier
        ImageSearch folder there; any other existing file or folder is refused.

        Returns:
            The folder written.

        Raises:
            FeaturescopeError: the model is not a zoo model (its architecture could not be
                rebuilt), or ``path`` exists and is not an ImageSearch folder.
        """
        from featurescope.zoo import save_checkpoint

        target = Path(path)
        if target.exists() and not (target / MANIFEST).is_file():
            raise FeaturescopeError(
                f"{target} exists and is not a saved ImageSearch (no {MANIFEST}); choose "
                "another path or remove it"
            )
        facts = _zoo_facts(self.model)
        if facts.name is None:
            raise FeaturescopeError(
                "only a zoo model can be saved with its search (its architecture is rebuilt by "
                "name); create it with featurescope.create_model or @featurescope.register_model"
            )
        paths = [_relative(p, self.root) if p is not None else None for p in self.index.metadata]
        manifest = {
            "format": FORMAT,
            "model": facts.name,
            "num_classes": facts.num_classes,
            "checkpoint": None if _weights_reproducible(self.model, facts) else WEIGHTS,
            "node": self.node,
            "preprocessing": self.preprocessing.to_dict(),
            "root": str(self.root) if self.root is not None else None,
            "class_names": self.class_names,
            "index": INDEX,
            "paths": paths,
            "skipped": [[_relative(p, self.root), why] for p, why in self.skipped],
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            relative = _relabelled(self.index, paths)
            relative.save(staging / INDEX)
            if manifest["checkpoint"] is not None:
                save_checkpoint(self.model, staging / WEIGHTS)
            with open(staging / MANIFEST, "w", encoding="utf-8") as fh:
                json.dump(manifest, fh, indent=1)
            os.chmod(staging, new_dir_mode())  # mkdtemp's 0700 is for secrets
            _swap_in(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(
        cls,
        path: PathLike,
        *,
        images: PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> ImageSearch:
        """Open a folder written by :meth:`save` or ``featurescope index build``.

        Args:
            path: the folder.
            images: where the indexed images are now, if they moved (default: the folder
                recorded at build time).
            device: where to put the model and the index.

        Raises:
            IndexFileError: ``path`` is not a saved ImageSearch, or its files are damaged.
        """
        from featurescope.zoo import create_model, load_checkpoint

        folder = Path(path)
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            raise IndexFileError(
                f"{folder} is not a saved ImageSearch (no {MANIFEST}); build one with "
                "featurescope.ImageSearch.build(...).save(path) or 'featurescope index build'"
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise IndexFileError(f"{manifest_path} is not readable JSON: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise IndexFileError(
                f"{manifest_path} is not an ImageSearch manifest of format {FORMAT!r}"
            )
        for key in ("index", "checkpoint"):
            name = manifest.get(key)
            if name is not None and (not isinstance(name, str) or Path(name).name != name):
                raise IndexFileError(f"{manifest_path}: {key!r} must name a file in the folder")
        index = EmbeddingIndex.load(folder / manifest["index"], device=device)
        if manifest["checkpoint"] is None:
            model = create_model(manifest["model"], num_classes=manifest.get("num_classes"))
        else:
            model = load_checkpoint(folder / manifest["checkpoint"], map_location=device)
        model.eval().to(device)
        root = Path(images) if images is not None else manifest.get("root")
        paths = manifest["paths"]
        if len(paths) != len(index):
            raise IndexFileError(
                f"{manifest_path} lists {len(paths)} images for an index of {len(index)}"
            )
        resolved = [
            None if p is None else str(Path(root) / p) if root is not None else p for p in paths
        ]
        return cls(
            model,
            _relabelled(index, resolved),
            node=manifest["node"],
            preprocessing=Preprocessing.from_dict(manifest["preprocessing"]),
            root=root,
            class_names=manifest.get("class_names"),
            skipped=[(p, why) for p, why in manifest.get("skipped", [])],
        )


def _relabelled(index: EmbeddingIndex, metadata: list[str | None]) -> EmbeddingIndex:
    """A copy of ``index`` whose metadata strings are ``metadata``."""
    labels = index.labels
    if bool((labels < 0).all()):
        kept: torch.Tensor | None = None
    elif bool((labels >= 0).all()):
        kept = labels
    else:
        raise FeaturescopeError("an ImageSearch index must label all of its images or none")
    copy = EmbeddingIndex(
        index.dim, device=index.device, dtype=index.dtype, memory_budget=index.memory_budget
    )
    if len(index):
        copy.add(index.vectors, ids=index.ids, labels=kept, metadata=metadata)
    return copy


def _swap_in(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, replacing an old folder there only once both exist."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
