"""Search by image as one object: a model, its embedding node and preprocessing, and an index.

:class:`ImageSearch` is what ``featurescope index build`` saves and ``index search`` and
``featurescope explore`` load: a folder (``my.fsindex/``) holding the
:class:`~featurescope.EmbeddingIndex`, the model's weights as a safetensors checkpoint (left out
when the zoo name alone rebuilds them) and ``search.json`` naming the model, the node, the
preprocessing, where the weights came from (``"random"`` when they are), the images (relative to
their root, so that ``load(path, root=...)`` re-points a moved folder) and the class names.
Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from featurescope._io import new_dir_mode
from featurescope._torch_utils import model_device, training_mode
from featurescope.data import ImageFolder
from featurescope.data.transforms import Preprocessing
from featurescope.errors import FeaturescopeError, IndexFileError, InputShapeError
from featurescope.index import EmbeddingIndex, SearchResult
from featurescope.pages import weights_sentence
from featurescope.study._experiments import embedding_node
from featurescope.study._owned_folder import (
    check_replaceable,
    owned_folder_lock,
    remove_leftovers,
    replace_owned_folder,
    staging_folder,
)
from featurescope.study._search_manifest import check_manifest
from featurescope.tap import FeatureTap
from featurescope.zoo.metadata import (
    ModelMetadata,
    model_metadata,
    model_name,
    resolve_preprocessing,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ImageSearch", "weights_sentence"]

PathLike = str | os.PathLike[str]

FORMAT = "featurescope-image-search/1"
MANIFEST, INDEX, WEIGHTS = "search.json", "index.safetensors", "model.safetensors"
#: Everything a saved search's folder may hold: a folder with anything else is not replaced.
_OWN_FILES = frozenset({MANIFEST, INDEX, WEIGHTS})
_FORMAT_PREFIX = FORMAT.rsplit("/", 1)[0] + "/"


def _relative(path: str, root: Path | None) -> str:
    if root is not None:
        with contextlib.suppress(ValueError):
            return Path(path).resolve().relative_to(root).as_posix()
    return str(Path(path).resolve())


def _display_name(path: str, root: Path | None) -> str:
    if root is not None:
        with contextlib.suppress(ValueError):
            return Path(os.path.abspath(path)).relative_to(root).as_posix()
    return Path(path).name


def _placeholder() -> torch.Tensor:
    """A light grey square standing in for an image that is not there any more."""
    return torch.full((3, 32, 32), 0.85)


def _weights_reproducible(model: nn.Module, meta: ModelMetadata) -> bool:
    """Whether ``create_model(name)`` alone gives these weights (e.g. pretrained, fixed ones)."""
    from featurescope.zoo import create_model

    ours = model.state_dict()
    # Built under two different seeds: random initial weights differ between them (even where
    # the caller's seed happened to give these), weights the builder fixes do not.
    for seed in (12345, 54321):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                theirs = create_model(meta.architecture, num_classes=meta.num_classes).state_dict()
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
        meta = model_metadata(model)
        self.model = model
        self.index = index
        self.node: str = embedding_node(model, node)
        self.preprocessing: Preprocessing = resolve_preprocessing(model, preprocessing)
        self.root: Path | None = Path(root).resolve() if root is not None else None
        if class_names is None and meta is not None:
            class_names = meta.class_names
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None
        #: Where the model's weights came from (its metadata's ``weights``): ``"random"``, a
        #: pretrained tag, ``"checkpoint:..."``, or ``None`` when not known.
        self.weights: str | None = meta.weights if meta is not None else None
        self._tap: FeatureTap | None = None

    def __repr__(self) -> str:
        return (
            f"ImageSearch({model_name(self.model)}, node={self.node!r}, {len(self.index)} images, "
            f"{self.index.dim}-d, weights={self.weights!r}, "
            f"root={str(self.root) if self.root else None!r})"
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
        metric: str = "l2",
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
            metric: how images are compared: ``"l2"`` (Euclidean distance, the study's),
                ``"cosine"`` or ``"ip"`` (similarities, largest first); see
                :class:`~featurescope.EmbeddingIndex`. Saved with the search.

        Raises:
            EmptyDatasetError: the folder holds no readable image.
        """
        from featurescope.study._experiments import embed, index_embeddings  # they build these

        prep = resolve_preprocessing(model, preprocessing)
        root = Path(folder)
        if (root / "train").is_dir():
            root = root / "train"
        dataset = ImageFolder(root, prep.transform())
        extraction = embed(
            model, dataset, node=node, batch_size=batch_size, device=device, progress=progress
        )
        index = index_embeddings(extraction, metric=metric)
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
        from featurescope.data.folders import as_rgb, load_rgb

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
            else:
                image = as_rgb(image)  # a PIL image in memory: converted as a file would be
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

    def gallery_ids(self, images: Sequence[PathLike]) -> list[int | None]:
        """The id of each image file that is in the gallery (the same file), else ``None``.

        Files are compared by their resolved path, so ``photos/../photos/a.jpg`` is
        ``photos/a.jpg``; a copy of an image elsewhere is not the gallery's.

        Example:
            >>> import tempfile, featurescope as fs
            >>> root = fs.data.make_synthetic_dataset(tempfile.mkdtemp(), train_per_class=1,
            ...                                       val_per_class=0, test_per_class=1, size=32)
            >>> search = fs.ImageSearch.build(fs.create_model("alexnet_half"), root, progress=False)
            >>> inside, outside = search.index.metadata[0], fs.data.ImageFolder(root / "test").paths[0]
            >>> search.gallery_ids([inside, outside])
            [0, None]
        """
        by_path = {os.path.realpath(p): i for i, p in self.image_paths().items() if p is not None}
        return [by_path.get(os.path.realpath(os.fspath(image))) for image in images]

    def missing_images(self) -> list[str]:
        """The indexed images whose files are not where the index says (moved or deleted).

        Re-point a moved folder with ``ImageSearch.load(path, root=new_folder)``.
        """
        return [p for p in self.index.metadata if p is not None and not os.path.isfile(p)]

    def missing_summary(self, limit: int = 5) -> str | None:
        """One line naming the missing images (:meth:`missing_images`), or ``None`` if none.

        Example:
            >>> import torch, featurescope as fs
            >>> index = fs.EmbeddingIndex(2)
            >>> index.add(torch.zeros(2, 2), metadata=["/gone/a.jpg", "/gone/b.png"])
            >>> search = fs.ImageSearch(fs.create_model("alexnet_half"), index, node="fc.4")
            >>> print(search.missing_summary().split(" (")[0])
            2 of 2 indexed images are missing: a.jpg, b.png
        """
        missing = self.missing_images()
        if not missing:
            return None
        names = [_display_name(p, self.root) for p in missing[:limit]]
        more = f" and {len(missing) - limit} more" if len(missing) > limit else ""
        return (
            f"{len(missing)} of {len(self.index)} indexed images are missing: "
            f"{', '.join(names)}{more} (moved? re-point the folder with root=... or --root DIR)"
        )

    def display_name(self, path: PathLike) -> str:
        """How a page names an image: its path below the gallery's root, else its file name.

        Example:
            >>> import torch, featurescope as fs
            >>> search = fs.ImageSearch(fs.create_model("alexnet_half"), fs.EmbeddingIndex(2),
            ...                         node="fc.4", root="/photos")
            >>> search.display_name("/photos/trip/cat.jpg"), search.display_name("/tmp/q.png")
            ('trip/cat.jpg', 'q.png')
        """
        return _display_name(os.fspath(path), self.root)

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
        missing = set(self.missing_images())
        labels: dict[int, Any] = self.labels()
        pictures: dict[int, Any] = {}
        for i, path in self.image_paths().items():
            pictures[i] = path
            if path in missing:
                # A moved or deleted file: a placeholder captioned with its name, not a failure.
                pictures[i] = _placeholder()
                labels[i] = f"missing: {Path(path).name}"
        return visualize(
            "montage",
            result,
            images=pictures,
            queries=queries,
            labels=labels,
            class_names=self.class_names,
            title=title or f"{result.ids.shape[1]} nearest images",
        )

    def serve(self, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
        """Serve this search as a local web app until interrupted (Ctrl-C): drop in a photo for
        its neighbours, maps and Grad-CAM; see :func:`featurescope.serve.serve` for the options.

        Needs ``pip install 'featurescope[serve]'``. Binds 127.0.0.1 unless ``host`` says
        otherwise (then it warns); ``port=0`` picks a free port. The URL is printed.
        """
        from featurescope.serve import serve

        serve(self, host=host, port=port, **options)

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: PathLike, *, overwrite: bool = True) -> Path:
        """Write this search to the folder ``path`` (e.g. ``photos.fsindex``), atomically.

        The folder is assembled beside ``path`` and exchanged into place in one step, so the
        path always holds the old search or the new one. Only a folder that featurescope
        wrote, holding nothing but a saved search's files, is ever replaced: a folder with
        anything else in it (a photo, a note) is refused and left as it was. Saves to one path
        are serialised with a lock on the parent folder, and the temporary folders of a killed save
        are removed by the next.

        Args:
            path: the folder to write.
            overwrite: replace a saved search already at ``path`` (default); with ``False``
                an existing one is refused.

        Returns:
            The folder written.

        Raises:
            FeaturescopeError: the model is not a zoo model (its architecture could not be
                rebuilt), or ``path`` exists and is not an ImageSearch folder.
        """
        from featurescope.zoo import save_checkpoint

        target = Path(path)
        check_replaceable(target, _OWN_FILES, _FORMAT_PREFIX, overwrite=overwrite)
        meta = model_metadata(self.model)
        if meta is None:
            raise FeaturescopeError(
                "only a zoo model can be saved with its search (its architecture is rebuilt by "
                "name); create it with featurescope.create_model or @featurescope.zoo.register_model"
            )
        paths = [_relative(p, self.root) if p is not None else None for p in self.index.metadata]
        manifest = {
            "format": FORMAT,
            "model": meta.architecture,
            "num_classes": meta.num_classes,
            "checkpoint": None if _weights_reproducible(self.model, meta) else WEIGHTS,
            # Where the weights came from: "random" stays "random" even though they are kept
            # in model.safetensors (which, reloaded, would read as a checkpoint).
            "weights": self.weights,
            "node": self.node,
            "preprocessing": self.preprocessing.to_dict(),
            "root": str(self.root) if self.root is not None else None,
            "class_names": self.class_names,
            "index": INDEX,
            "paths": paths,
            "skipped": [[_relative(p, self.root), why] for p, why in self.skipped],
        }
        with owned_folder_lock(target):
            remove_leftovers(target, _OWN_FILES)
            # Checked again under the lock: another process may have written there meanwhile.
            check_replaceable(target, _OWN_FILES, _FORMAT_PREFIX, overwrite=overwrite)
            staging = staging_folder(target)
            try:
                relative = _relabelled(self.index, paths)
                relative.save(staging / INDEX)
                if manifest["checkpoint"] is not None:
                    save_checkpoint(self.model, staging / WEIGHTS)
                with open(staging / MANIFEST, "w", encoding="utf-8") as fh:
                    json.dump(manifest, fh, indent=1)
                os.chmod(staging, new_dir_mode())  # mkdtemp's 0700 is for secrets
                replace_owned_folder(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return target

    @classmethod
    def load(
        cls,
        path: PathLike,
        *,
        root: PathLike | None = None,
        images: PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> ImageSearch:
        """Open a folder written by :meth:`save` or ``featurescope index build``.

        Image paths are stored relative to the gallery's root, so a moved folder is re-pointed
        by naming where it is now. Images that are missing are not an error here:
        :meth:`missing_images` lists them, :meth:`montage` draws a placeholder for each, and the
        explorer marks them.

        Args:
            path: the folder.
            root: where the indexed images are now, if they moved (default: the folder
                recorded at build time).
            images: the former name of ``root``.
            device: where to put the model and the index.

        Raises:
            IndexFileError: ``path`` is not a saved ImageSearch, or its files are damaged.
            FeaturescopeError: both ``root`` and ``images`` are given, or ``root`` is not a
                folder.
        """
        from featurescope.zoo import attach_metadata, create_model, load_checkpoint, model_metadata

        if root is not None and images is not None:
            raise FeaturescopeError("give root=... (or its former name images=...), not both")
        new_root = root if root is not None else images
        if new_root is not None and not Path(new_root).is_dir():
            raise FeaturescopeError(
                f"root {os.fspath(new_root)!r} is not a folder; pass the folder the indexed "
                "images were moved to"
            )
        folder = Path(path)
        manifest = _read_manifest(folder)
        index = EmbeddingIndex.load(folder / manifest["index"], device=device)
        if manifest["checkpoint"] is None:
            model = create_model(manifest["model"], num_classes=manifest.get("num_classes"))
        else:
            checkpoint = folder / manifest["checkpoint"]
            if not checkpoint.is_file():
                raise IndexFileError(
                    f"{folder / MANIFEST} names the checkpoint {manifest['checkpoint']!r}, which "
                    f"is not a file in {folder}: the folder is incomplete; save the ImageSearch "
                    "again"
                )
            model = load_checkpoint(checkpoint, map_location=device)
        meta = model_metadata(model)
        if meta is not None and "weights" in manifest:
            # The origin recorded at save time: random weights kept in model.safetensors are
            # still random weights.
            attach_metadata(model, meta.replace(weights=manifest["weights"]))
        model.eval().to(device)
        base = Path(new_root).resolve() if new_root is not None else manifest.get("root")
        paths = manifest["paths"]
        if len(paths) != len(index):
            raise IndexFileError(
                f"{folder / MANIFEST} lists {len(paths)} images for an index of {len(index)}"
            )
        resolved = [
            None if p is None else str(Path(base) / p) if base is not None else p for p in paths
        ]
        search = cls(
            model,
            _relabelled(index, resolved),
            node=manifest["node"],
            preprocessing=Preprocessing.from_dict(manifest["preprocessing"]),
            root=base,
            class_names=manifest.get("class_names"),
            skipped=[(p, why) for p, why in manifest.get("skipped", [])],
        )
        if meta is None or "weights" not in manifest:
            search.weights = manifest.get("weights")  # an older folder: not recorded
        return search


def _read_manifest(folder: Path) -> dict[str, Any]:
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
        raise IndexFileError(f"{manifest_path} is not an ImageSearch manifest of format {FORMAT!r}")
    return check_manifest(manifest_path, manifest)


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
        index.dim,
        device=index.device,
        dtype=index.dtype,
        memory_budget=index.memory_budget,
        metric=index.metric,
        config=index.config,
    )
    if len(index):
        copy.add(index.vectors, ids=index.ids, labels=kept, metadata=metadata)
    return copy
