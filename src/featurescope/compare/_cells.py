"""Which estimator each cell uses, and the sums of both estimators for the whole matrix."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from featurescope.compare._estimators import AllReduce, ExactMoments, MinibatchHSIC
from featurescope.errors import FeaturescopeError

__all__ = ["ESTIMATORS", "MAX_EXACT_OFFSET", "Cells", "choose_estimators", "exact_offset"]

#: ``estimator=`` values: ``"auto"`` picks per cell, the others force one for every cell.
ESTIMATORS = ("auto", "exact", "minibatch")
#: The largest offset for independent features that ``"auto"`` accepts from the exact estimator.
MAX_EXACT_OFFSET = 0.01


def exact_offset(p: int, q: int, n: int) -> float:
    """How far above 0 the exact estimator sits for independent features: about
    ``sqrt(pq / ((n + p)(n + q)))`` for widths ``p``, ``q`` over ``n`` images.

    From the Wishart moments of independent Gaussian features: ``E||X̃ᵀỸ||² ≈ npq`` and
    ``E||X̃ᵀX̃||² ≈ np(n + p)``.

    Example:
        >>> round(exact_offset(40, 40, 2000), 4)  # p / (n + p)
        0.0196
    """
    return math.sqrt(p * q / ((n + p) * (n + q)))


def choose_estimators(
    widths_a: Sequence[int],
    widths_b: Sequence[int],
    num_images: int,
    estimator: str,
    max_exact_features: int,
) -> tuple[tuple[str, ...], ...]:
    """Each cell's estimator: under ``"auto"``, exact only where it is cheap and near unbiased.

    A cell is exact when both its widths are at most ``max_exact_features`` (the exact sums
    take ``p² + q² + pq`` float64 values: 128 MiB a matrix at 4096) and its offset for
    independent features, :func:`exact_offset`, is at most :data:`MAX_EXACT_OFFSET` (1 %):
    over 2,000 images that is nodes up to about 20 features (logits), over 100,000 images up to
    about 1,000. Everywhere else the unbiased minibatch estimator is used: its memory is
    ``batch_size²`` per node and it has no offset, so the cells of one matrix stay comparable.
    A mix of a biased full-dataset cell (about 0.89 for two independent 512-wide
    representations over 64 images) beside unbiased ones (0 in expectation) would draw
    structure that is not there.

    Example:
        >>> choose_estimators([5, 512], [5], 2000, "auto", 4096)
        (('exact',), ('minibatch',))
        >>> choose_estimators([5, 512], [5], 2000, "exact", 4096)
        (('exact',), ('exact',))
    """
    if estimator != "auto":
        return tuple((estimator,) * len(widths_b) for _ in widths_a)
    return tuple(
        tuple(
            "exact"
            if max(p, q) <= max_exact_features
            and exact_offset(p, q, num_images) <= MAX_EXACT_OFFSET
            else "minibatch"
            for q in widths_b
        )
        for p in widths_a
    )


@dataclass
class Cells:
    """Both estimators' sums, each over its own cells of the matrix."""

    widths_a: tuple[int, ...]
    widths_b: tuple[int, ...]
    estimators: tuple[tuple[str, ...], ...]
    exact: ExactMoments
    minibatch: MinibatchHSIC

    @classmethod
    def create(
        cls,
        widths_a: Sequence[int],
        widths_b: Sequence[int],
        estimators: Sequence[Sequence[str]],
        device: torch.device,
    ) -> Cells:
        """Zero sums for a matrix of these node widths and estimators."""
        chosen = tuple(tuple(row) for row in estimators)
        cells = [(i, j, e) for i, row in enumerate(chosen) for j, e in enumerate(row)]
        exact = [(i, j) for i, j, e in cells if e == "exact"]
        minibatch = [(i, j) for i, j, e in cells if e == "minibatch"]
        return cls(
            tuple(widths_a),
            tuple(widths_b),
            chosen,
            ExactMoments(exact, widths_a, widths_b, device),
            MinibatchHSIC(minibatch, len(widths_a), len(widths_b), device),
        )

    def update(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        """Add one batch: each node's ``[m, p]`` float64 features, in node order."""
        for side, widths, feats in (("A", self.widths_a, xs), ("B", self.widths_b, ys)):
            for i, (width, f) in enumerate(zip(widths, feats, strict=True)):
                if f.shape[1] != width:
                    raise FeaturescopeError(
                        f"node {i} of model {side} gives {f.shape[1]} features per image here "
                        f"but {width} before; compare needs images of one size (resize them in "
                        "the dataset's transform)"
                    )
        a, b = dict(enumerate(xs)), dict(enumerate(ys))
        self.exact.update(a, b)
        self.minibatch.update(a, b)

    def combine(self, all_reduce: AllReduce) -> None:
        """Add up every rank's sums (in place, on every rank)."""
        self.exact.combine(all_reduce)
        self.minibatch.combine(all_reduce)

    def matrix(self) -> torch.Tensor:
        """The CKA matrix, float64, each cell from its estimator."""
        values = [
            [(self.exact if e == "exact" else self.minibatch).cka(i, j) for j, e in enumerate(row)]
            for i, row in enumerate(self.estimators)
        ]
        return torch.tensor(values, dtype=torch.float64).reshape(
            len(self.widths_a), len(self.widths_b)
        )

    def spec(self) -> dict[str, Any]:
        """What :meth:`create` needs to rebuild these cells: widths and estimators."""
        return {
            "widths_a": list(self.widths_a),
            "widths_b": list(self.widths_b),
            "estimators": [list(row) for row in self.estimators],
        }

    def state(self) -> dict[str, torch.Tensor]:
        """Every sum as a named tensor (see :meth:`load`)."""
        exact = {f"exact/{k}": v for k, v in self.exact.state().items()}
        minibatch = {f"minibatch/{k}": v for k, v in self.minibatch.state().items()}
        return {**exact, **minibatch}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take the sums back from :meth:`state`."""
        for prefix, sums in (("exact/", self.exact), ("minibatch/", self.minibatch)):
            sums.load({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    def undefined(self) -> list[tuple[int, int]]:
        """Cells whose CKA is not defined (a node constant over the images)."""
        matrix = self.matrix()
        return [
            (i, j)
            for i in range(matrix.shape[0])
            for j in range(matrix.shape[1])
            if math.isnan(float(matrix[i, j]))
        ]
