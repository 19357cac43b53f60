"""Retrieval quality from labels: precision@k, recall@k, R-precision and mAP@R.

The definitions follow pytorch-metric-learning's ``AccuracyCalculator``: for a query with label
``y``, ``R`` is the number of gallery vectors labelled ``y`` (not counting the query's own entry
when the queries are the gallery); queries with ``R = 0`` ("lone" queries) are left out of every
average; ``R-precision`` is the fraction of the ``R`` nearest that are relevant, and
``mAP@R = (1/R) Σ_{i≤R} P(i)·rel(i)`` with ``P(i)`` the precision of the ``i`` nearest (Musgrave
et al., "A Metric Learning Reality Check", 2020).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from featurescope.errors import EmbeddingIndexError
from featurescope.index._checks import as_exclusions, as_labels, as_vectors

if TYPE_CHECKING:
    from featurescope.index._embedding import EmbeddingIndex

__all__ = ["metrics_from_hits", "retrieval_metrics"]


def metrics_from_hits(
    hit_labels: Tensor, query_labels: Tensor, relevant: Tensor, k: int
) -> dict[str, float]:
    """Metrics from the labels of each query's ranked hits.

    Args:
        hit_labels: ``[nq, K]`` labels of the ``K >= max(k, max(relevant))`` nearest hits.
        query_labels: ``[nq]`` the queries' labels.
        relevant: ``[nq]`` number ``R`` of relevant gallery entries per query.
        k: cut-off of precision@k and recall@k.

    Returns:
        ``precision_at_1``, ``precision_at_k``, ``recall_at_k``, ``r_precision``,
        ``mean_average_precision_at_r`` (means over queries with ``R > 0``) and
        ``num_queries``, the number of such queries.
    """
    keep = relevant > 0
    hits = (hit_labels[keep] == query_labels[keep, None]).to(torch.float64)
    r = relevant[keep].to(torch.float64)
    nq, width = hits.shape
    if nq == 0:
        zero = {"precision_at_1": 0.0, "precision_at_k": 0.0, "recall_at_k": 0.0}
        return {**zero, "r_precision": 0.0, "mean_average_precision_at_r": 0.0, "num_queries": 0}
    rank = torch.arange(1, width + 1, dtype=torch.float64)
    within_r = rank[None, :] <= r[:, None]
    top_k = hits[:, :k].sum(1)
    relevant_hits = hits * within_r
    precision_at_i = hits.cumsum(1) / rank
    return {
        "precision_at_1": float(hits[:, 0].mean()),
        "precision_at_k": float((top_k / k).mean()),
        "recall_at_k": float((top_k / r).mean()),
        "r_precision": float((relevant_hits.sum(1) / r).mean()),
        "mean_average_precision_at_r": float(((precision_at_i * relevant_hits).sum(1) / r).mean()),
        "num_queries": nq,
    }


def _query_labels(data: Any, nq: int) -> Tensor:
    """``nq`` integer labels; ``-1`` marks a query without one (left out, as a lone query)."""
    try:
        t = data.detach().cpu() if isinstance(data, Tensor) else torch.as_tensor(np.asarray(data))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EmbeddingIndexError(f"query_labels must be integers ({exc})") from exc
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise EmbeddingIndexError(f"query_labels must be integers, got dtype {t.dtype}")
    shifted: Tensor = as_labels(t.to(torch.int64) + 1, nq) - 1
    return shifted


def retrieval_metrics(
    index: EmbeddingIndex,
    queries: Any = None,
    query_labels: Any = None,
    *,
    k: int = 10,
    exclude_ids: Any = None,
) -> dict[str, float]:
    """Score retrieval by labels: precision@1, precision@k, recall@k, R-precision, mAP@R.

    With ``queries=None`` every indexed vector is a query and its own entry is excluded
    ("leave one out"), as pytorch-metric-learning does when queries and references are the same.

    Args:
        index: an index whose every vector has a label.
        queries: ``[nq, dim]`` query vectors, or ``None`` for the index's own vectors.
        query_labels: ``[nq]`` labels of ``queries`` (required with ``queries``).
        k: cut-off of precision@k and recall@k.
        exclude_ids: per-query ids to leave out, as for :meth:`EmbeddingIndex.search`; they
            are not counted as relevant either.

    Returns:
        A dict: ``precision_at_1``, ``precision_at_k``, ``recall_at_k`` (relevant among the
        ``k`` nearest over ``R``), ``r_precision``, ``mean_average_precision_at_r``, and
        ``num_queries`` (queries with ``R > 0``; the others are left out of the means).

    Raises:
        EmbeddingIndexError: if a vector has no label, ``k`` is not a positive int or more
            than a query can retrieve, or a query label is below -1 (no label) or not an integer.
        InputShapeError: if ``queries`` is not ``[nq, dim]`` or ``query_labels`` not ``[nq]``.

    Example:
        >>> import torch, featurescope as fs
        >>> index = fs.EmbeddingIndex(1)
        >>> index.add(torch.tensor([[0.0], [0.1], [5.0], [5.2]]), labels=[0, 0, 1, 1])
        >>> fs.index.retrieval_metrics(index, k=1)["precision_at_1"]
        1.0
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise EmbeddingIndexError(f"k must be an int >= 1, got {k!r}")
    gallery_labels = index.labels
    if len(index) == 0 or bool((gallery_labels < 0).any()):
        raise EmbeddingIndexError("retrieval_metrics needs an index whose vectors all have labels")
    if queries is None:
        queries, exclude_ids = index.vectors, index.ids
        qlab = gallery_labels
    else:
        if query_labels is None:
            raise EmbeddingIndexError("pass query_labels with queries")
        q = as_vectors(queries, index.dim, "queries")
        qlab = _query_labels(query_labels, q.shape[0])
        queries = q
    nq = len(qlab)
    excl = as_exclusions(exclude_ids, nq)
    counts = torch.bincount(gallery_labels, minlength=int(qlab.max()) + 1 if nq else 1)
    relevant = counts[qlab.clamp(min=0)] * (qlab >= 0)
    if excl is not None:
        # An excluded gallery entry with the query's label is not retrievable, so not relevant.
        known = torch.isin(excl, index.ids)
        lookup = dict(zip(index.ids.tolist(), gallery_labels.tolist(), strict=True))
        ex_lab = torch.tensor(
            [[lookup.get(i, -2) for i in row] for row in excl.tolist()], dtype=torch.int64
        ).reshape(excl.shape)
        relevant = relevant - ((ex_lab == qlab[:, None]) & known).sum(1)
    width = min(len(index) - (0 if excl is None else excl.shape[1]), max(k, int(relevant.max())))
    if width < k:
        raise EmbeddingIndexError(f"k={k} is larger than the vectors a query can retrieve")
    result = index.search(queries, width, exclude_ids=excl)
    return metrics_from_hits(result.labels.cpu(), qlab, relevant, k)
