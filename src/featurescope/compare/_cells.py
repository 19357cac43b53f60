"""Which estimator each cell uses, and the sums of both estimators for the whole matrix."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from featurescope.compare._estimators import AllReduce, ExactMoments, MinibatchHSIC
from featurescope.errors import FeaturescopeError

__all__ = ["ESTIMATORS", "Cells", "choose_estimators"]

#: ``estimator=`` values: ``"auto"`` picks per cell, the others force one for every cell.
ESTIMATORS = ("auto", "exact", "minibatch")


def choose_estimators(
    widths_a: Sequence[int], widths_b: Sequence[int], estimator: str, max_exact_features: int
) -> tuple[tuple[str, ...], ...]:
    """Each cell's estimator: under ``"auto"``, exact where both nodes are narrow enough.

    The exact estimator keeps ``p_a² + p_b² + p_a p_b`` float64 sums: with both widths at most
    ``max_exact_features`` (4096 by default: 128 MiB a matrix) that is bounded, and it gives the
    whole dataset's CKA, which no batch size changes. A wider node (a flattened early conv
    layer: AlexNet's conv1 has 69,984 features) would need gigabytes, and over fewer images
    than features the full-dataset estimate sits far above 0 even for unrelated features; the
    unbiased minibatch estimator needs ``m²`` per node and has neither problem.

    Example:
        >>> choose_estimators([96, 69984], [96], "auto", 4096)
        (('exact',), ('minibatch',))
    """
    if estimator != "auto":
        return tuple((estimator,) * len(widths_b) for _ in widths_a)
    return tuple(
        tuple("exact" if max(p, q) <= max_exact_features else "minibatch" for q in widths_b)
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
            [
                (self.exact if e == "exact" else self.minibatch).cka(i, j)
                for j, e in enumerate(row)
            ]
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
