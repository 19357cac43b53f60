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
    "FeaturescopeError",
    "FeaturescopeWarning",
    "IndexFileError",
    "InputShapeError",
    "NodeNotFoundError",
    "PluginError",
    "UnknownNameError",
    "UnsafeCheckpointError",
    "VisualizationError",
    "WeightsUnavailableError",
    "did_you_mean",
]


class FeaturescopeError(Exception):
    """Base class of every error featurescope raises on purpose."""


class FeaturescopeWarning(UserWarning):
    """Base class of featurescope's warnings (e.g. a fallback from torch.fx to hooks)."""


class UnknownNameError(FeaturescopeError, KeyError):
    """A model, visualizer or other registered name does not exist."""

    def __str__(self) -> str:
        # KeyError.__str__ would wrap the message in quotes.
        return str(self.args[0]) if self.args else ""


class NodeNotFoundError(UnknownNameError):
    """A graph node name given to :class:`~featurescope.FeatureTap` is not in the model."""


class InputShapeError(FeaturescopeError, ValueError):
    """An input tensor has the wrong shape for the model (e.g. 224×224 for a 227×227 net)."""


class CheckpointError(FeaturescopeError, ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint can only be read by unpickling arbitrary objects, which may run code."""


class WeightsUnavailableError(FeaturescopeError, OSError):
    """Pretrained weights are neither cached locally nor downloadable."""


class IndexFileError(FeaturescopeError, ValueError):
    """A saved :class:`~featurescope.EmbeddingIndex` file is truncated, corrupt or foreign."""


class EmbeddingIndexError(FeaturescopeError, ValueError):
    """An :class:`~featurescope.EmbeddingIndex` got vectors, ids or a ``k`` it cannot use.

    For example NaN in a vector, a duplicate id, ``k`` larger than the index, or a search of an
    empty index. Vectors of the wrong shape raise :class:`InputShapeError` instead.
    """


class PluginError(FeaturescopeError):
    """A plugin failed to load, raised inside a hook, or clashed with another plugin."""


class VisualizationError(FeaturescopeError, ValueError):
    """A visualizer was given an option value or data it cannot draw (e.g. ``alpha=2``)."""


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
