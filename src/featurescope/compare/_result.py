"""What :func:`featurescope.compare` returns: the CKA matrix, and what each number stands on."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Comparison"]


@dataclass(frozen=True)
class Comparison:
    """Linear CKA between every node of one model and every node of another.

    Attributes:
        matrix: ``[len(nodes_a), len(nodes_b)]`` float64 tensor; ``matrix[i, j]`` is the linear
            CKA of node ``nodes_a[i]`` of model A with node ``nodes_b[j]`` of model B, NaN where
            a node's features are constant over the images.
        estimators: for each cell, ``"exact"`` (full-dataset linear CKA) or ``"minibatch"``
            (unbiased HSIC₁ averaged over batches), as nested tuples shaped like ``matrix``.
        num_images: the images both models saw (on every rank together).
        nodes_a: model A's node names, in row order.
        nodes_b: model B's node names, in column order.
        model_a: model A's architecture name (its class name outside the zoo).
        model_b: model B's.
        reduce: how a node's output became one vector per image: ``"flatten"`` or
            ``"avgpool"``.
        batch_size: images per batch: the minibatch estimator's batch (a remainder of fewer
            than 4 images joins the last batch).
        num_batches: batches in all.

    Example:
        >>> import torch
        >>> result = Comparison(torch.eye(2, dtype=torch.float64), (("exact",) * 2,) * 2, 100,
        ...                     ("conv1", "fc"), ("conv1", "fc"), "alexnet", "alexnet")
        >>> result["fc", "fc"]
        1.0
        >>> print(result.to_csv(), end="")
        node,conv1,fc
        conv1,1.0,0.0
        fc,0.0,1.0
    """

    matrix: torch.Tensor
    estimators: tuple[tuple[str, ...], ...]
    num_images: int
    nodes_a: tuple[str, ...]
    nodes_b: tuple[str, ...]
    model_a: str
    model_b: str
    reduce: str = "flatten"
    batch_size: int = 0
    num_batches: int = 0

    def __getitem__(self, cell: tuple[str, str]) -> float:
        """The CKA of ``(node of A, node of B)``, by name."""
        a, b = cell
        return float(self.matrix[self.nodes_a.index(a), self.nodes_b.index(b)])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; NaN cells become ``None`` (JSON has no NaN)."""
        rows = [[None if math.isnan(v) else v for v in row] for row in self.matrix.tolist()]
        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "nodes_a": list(self.nodes_a),
            "nodes_b": list(self.nodes_b),
            "matrix": rows,
            "estimators": [list(row) for row in self.estimators],
            "num_images": self.num_images,
            "reduce": self.reduce,
            "batch_size": self.batch_size,
            "num_batches": self.num_batches,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Comparison:
        """The inverse of :meth:`to_dict`."""
        matrix = torch.tensor(
            [[math.nan if v is None else float(v) for v in row] for row in data["matrix"]],
            dtype=torch.float64,
        ).reshape(len(data["nodes_a"]), len(data["nodes_b"]))
        return cls(
            matrix=matrix,
            estimators=tuple(tuple(row) for row in data["estimators"]),
            num_images=int(data["num_images"]),
            nodes_a=tuple(data["nodes_a"]),
            nodes_b=tuple(data["nodes_b"]),
            model_a=str(data["model_a"]),
            model_b=str(data["model_b"]),
            reduce=str(data.get("reduce", "flatten")),
            batch_size=int(data.get("batch_size", 0)),
            num_batches=int(data.get("num_batches", 0)),
        )

    def to_csv(self) -> str:
        """The matrix as CSV: a header of B's nodes, then one row per node of A (``repr`` floats,
        so the text reads back to the same float64)."""
        out = io.StringIO()
        out.write(",".join(["node", *map(_csv_cell, self.nodes_b)]) + "\n")
        for name, row in zip(self.nodes_a, self.matrix.tolist(), strict=True):
            out.write(",".join([_csv_cell(name), *(repr(float(v)) for v in row)]) + "\n")
        return out.getvalue()


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text
