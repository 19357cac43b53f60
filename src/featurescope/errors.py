"""The featurescope exception family.

Every error featurescope raises on purpose derives from :class:`FeaturescopeError`, so
``except featurescope.FeaturescopeError`` catches them all. Subclasses also derive from the
built-in exception a Python user would expect (``KeyError`` for an unknown name, ``ValueError``
for a bad argument), so existing ``except ValueError`` code keeps working.

Messages say what was wrong and how to fix it; where a name is unknown they list the closest
known names (see :func:`did_you_mean`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CheckpointError",
    "EmbeddingIndexError",
    "EmptyDatasetError",
    "FeaturescopeError",
    "FeaturescopeWarning",
    "IndexFileError",
    "InputShapeError",
    "NodeNotFoundError",
    "PluginError",
    "PluginOverrideWarning",
    "UnknownNameError",
    "UnsafeCheckpointError",
    "VisualizationError",
    "WeightsUnavailableError",
    "did_you_mean",
]


class FeaturescopeError(Exception):
    """Base class of every error featurescope raises on purpose.

    Example:
        >>> import featurescope as fs
        >>> try:
        ...     fs.create_model("alexnet", num_classes=0)
        ... except fs.FeaturescopeError as err:
        ...     print(err)
        num_classes must be a positive integer, got 0
    """


class FeaturescopeWarning(UserWarning):
    """Base class of featurescope's warnings (e.g. a fallback from torch.fx to hooks).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error", FeaturescopeWarning)  # make them errors
        ...     issubclass(FeaturescopeWarning, UserWarning)
        True
    """


class UnknownNameError(FeaturescopeError, KeyError):
    """A model, visualizer or other registered name does not exist.

    Example:
        >>> import featurescope as fs
        >>> try:
        ...     fs.create_model("alexnett")
        ... except KeyError as err:  # an UnknownNameError is a KeyError too
        ...     print(str(err).split(".")[0])
        unknown model 'alexnett'
    """

    def __str__(self) -> str:
        # KeyError.__str__ would wrap the message in quotes.
        return str(self.args[0]) if self.args else ""


class NodeNotFoundError(UnknownNameError):
    """A graph node name given to :class:`~featurescope.FeatureTap` is not in the model.

    Example:
        >>> import featurescope as fs
        >>> try:
        ...     fs.FeatureTap(fs.create_model("alexnet"), ["conv9"])
        ... except fs.errors.NodeNotFoundError as err:
        ...     "get_graph_node_names" in str(err)
        True
    """


class InputShapeError(FeaturescopeError, ValueError):
    """An input tensor has the wrong shape for the model (e.g. 224×224 for a 227×227 net).

    Example:
        >>> import torch, featurescope as fs
        >>> try:
        ...     fs.create_model("alexnet")(torch.zeros(1, 3, 224, 224))
        ... except fs.errors.InputShapeError as err:
        ...     "[N, 3, 227, 227]" in str(err)
        True
    """


class CheckpointError(FeaturescopeError, ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model.

    Example:
        >>> import featurescope as fs
        >>> try:
        ...     fs.zoo.load_checkpoint("no-such-file.safetensors")
        ... except fs.errors.CheckpointError as err:
        ...     print(err)
        checkpoint 'no-such-file.safetensors' does not exist or is not a file
    """


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint can only be read by unpickling arbitrary objects, which may run code.

    Example:
        >>> import tempfile, torch, featurescope as fs
        >>> path = tempfile.mkdtemp() + "/whole-model.pt"
        >>> torch.save(fs.create_model("alexnet_half"), path)  # pickles the whole object
        >>> try:
        ...     fs.zoo.load_checkpoint(path, model_name="alexnet_half")
        ... except fs.errors.UnsafeCheckpointError as err:
        ...     "--trust-pickle" in str(err)
        True
    """


class WeightsUnavailableError(FeaturescopeError, OSError):
    """Pretrained weights are neither cached locally nor downloadable.

    The message names the file to fetch and the folder to put it in.

    Example:
        >>> issubclass(WeightsUnavailableError, OSError)  # handled like any I/O failure
        True
    """


class EmptyDatasetError(FeaturescopeError, FileNotFoundError):
    """A dataset folder is missing, has no class folders, or a split holds no readable image.

    Example:
        >>> from featurescope.data import ImageFolder
        >>> try:
        ...     ImageFolder("no-such-folder")
        ... except FileNotFoundError as err:  # an EmptyDatasetError is a FileNotFoundError too
        ...     isinstance(err, EmptyDatasetError), "does not exist" in str(err)
        (True, True)
    """


class IndexFileError(FeaturescopeError, ValueError):
    """A saved :class:`~featurescope.EmbeddingIndex` file is truncated, corrupt or foreign.

    Example:
        >>> import pathlib, tempfile, featurescope as fs
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "index.safetensors"
        >>> _ = path.write_bytes(b"not an index")
        >>> try:
        ...     fs.EmbeddingIndex.load(path)
        ... except fs.errors.IndexFileError:
        ...     print("refused")
        refused
    """


class EmbeddingIndexError(FeaturescopeError, ValueError):
    """An :class:`~featurescope.EmbeddingIndex` got vectors, ids or a ``k`` it cannot use.

    For example NaN in a vector, a duplicate id, ``k`` larger than the index, or a search of an
    empty index. Vectors of the wrong shape raise :class:`InputShapeError` instead.

    Example:
        >>> import torch, featurescope as fs
        >>> index = fs.EmbeddingIndex(4)
        >>> try:
        ...     index.search(torch.zeros(1, 4), k=1)
        ... except fs.errors.EmbeddingIndexError:
        ...     print("empty index")
        empty index
    """


class PluginError(FeaturescopeError):
    """A plugin failed to load, raised inside a hook, or clashed with another plugin.

    Example:
        >>> import featurescope as fs
        >>> try:
        ...     fs.plugins.unregister_plugin("no-such-plugin")
        ... except fs.errors.PluginError as err:
        ...     "no-such-plugin" in str(err)
        True
    """


class PluginOverrideWarning(FeaturescopeWarning):
    """A third-party plugin replaced a builtin model or visualizer of the same name.

    Overriding is allowed (that is how a plugin improves a builtin), but ``create_model(name)``
    then builds the plugin's model under the builtin's name, so it is said once.

    Example:
        >>> issubclass(PluginOverrideWarning, FeaturescopeWarning)
        True
    """


class VisualizationError(FeaturescopeError, ValueError):
    """A visualizer was given an option value or data it cannot draw (e.g. ``alpha=2``).

    Example:
        >>> import torch, featurescope as fs
        >>> try:
        ...     fs.visualize("overlay", torch.rand(4, 4), image=torch.rand(3, 8, 8), alpha=2)
        ... except fs.errors.VisualizationError:
        ...     print("alpha must be in [0, 1]")
        alpha must be in [0, 1]
    """


def did_you_mean(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """Return a ``" Did you mean: a, b?"`` suffix naming the candidates closest to ``name``.

    Candidates are ranked by :class:`difflib.SequenceMatcher` similarity (ties keep their
    order), then names containing ``name`` or contained in it (``"conv"`` suggests ``"conv1"``). Returns ``""`` when nothing is close.

    Example:
        >>> did_you_mean("alexnt", ["alexnet", "resnet18", "vgg16"])
        " Did you mean: 'alexnet'?"
        >>> did_you_mean("conv", ["conv1", "conv2", "fc"])
        " Did you mean: 'conv1', 'conv2'?"
        >>> did_you_mean("zzz", ["alexnet"])
        ''
    """
    pool = list(dict.fromkeys(candidates))
    # Rank by similarity; equal scores keep the candidates' own order (difflib would not).
    scores = {c: difflib.SequenceMatcher(None, name, c).ratio() for c in pool}
    close = sorted((c for c in pool if scores[c] >= 0.6), key=lambda c: -scores[c])
    contains = [c for c in pool if name and (name in c or c in name)]
    ranked = list(dict.fromkeys(close + contains))[:n]
    if not ranked:
        return ""
    return " Did you mean: " + ", ".join(repr(c) for c in ranked) + "?"
