"""retrieval_metrics against a direct, loop-by-loop computation from a float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import featurescope as fs
from featurescope.errors import EmbeddingIndexError, InputShapeError


def direct_metrics(gallery, labels, queries, query_labels, k, self_ids=None):
    """Per query: rank the gallery in float64 (ties to smaller index), drop its own entry."""
    g = gallery.astype(np.float64)
    out = {key: [] for key in ("p1", "pk", "rk", "rp", "map")}
    for i, q in enumerate(queries.astype(np.float64)):
        dist = np.sqrt(((g - q) ** 2).sum(1))
        order = [
            j for j in np.lexsort((np.arange(len(g)), dist)) if self_ids is None or j != self_ids[i]
        ]
        rel = [labels[j] == query_labels[i] for j in order]
        r = sum(
            1
            for j in range(len(g))
            if labels[j] == query_labels[i] and (self_ids is None or j != self_ids[i])
        )
        if r == 0:
            continue
        out["p1"].append(float(rel[0]))
        out["pk"].append(sum(rel[:k]) / k)
        out["rk"].append(sum(rel[:k]) / r)
        out["rp"].append(sum(rel[:r]) / r)
        ap, hits = 0.0, 0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                ap += hits / (pos + 1)
        out["map"].append(ap / r)
    names = {
        "p1": "precision_at_1",
        "pk": "precision_at_k",
        "rk": "recall_at_k",
        "rp": "r_precision",
        "map": "mean_average_precision_at_r",
    }
    result = {names[key]: float(np.mean(v)) if v else 0.0 for key, v in out.items()}
    result["num_queries"] = len(out["p1"])
    return result


@settings(max_examples=25)
@given(
    n=st.integers(2, 40),
    classes=st.integers(1, 6),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
    duplicates=st.booleans(),
)
def test_leave_one_out_matches_direct_computation(n, classes, k, seed, duplicates):
    rng = np.random.default_rng(seed)
    g = (
        rng.integers(-2, 3, (n, 3)).astype(np.float32)
        if duplicates
        else rng.standard_normal((n, 3)).astype(np.float32)
    )
    labels = rng.integers(0, classes, n)
    k = min(k, n - 1)
    index = fs.EmbeddingIndex(3)
    index.add(g, labels=labels)
    got = fs.index.retrieval_metrics(index, k=k)
    want = direct_metrics(g, labels, g, labels, k, self_ids=np.arange(n))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_separate_queries_and_lone_labels():
    rng = np.random.default_rng(3)
    g = rng.standard_normal((30, 4)).astype(np.float32)
    labels = rng.integers(0, 3, 30)
    q = rng.standard_normal((12, 4)).astype(np.float32)
    qlab = rng.integers(0, 5, 12)  # labels 3 and 4 are in no gallery entry: lone queries
    index = fs.EmbeddingIndex(4)
    index.add(g, labels=labels)
    got = fs.index.retrieval_metrics(index, q, qlab, k=3)
    want = direct_metrics(g, labels, q, qlab, 3)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["num_queries"] == int(np.isin(qlab, labels).sum())


def test_perfect_and_hopeless_retrieval():
    index = fs.EmbeddingIndex(1)
    index.add(
        torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]]), labels=[0, 0, 0, 1, 1, 1]
    )
    perfect = fs.index.retrieval_metrics(index, k=2)
    assert all(
        perfect[key] == 1.0
        for key in ("precision_at_1", "r_precision", "mean_average_precision_at_r")
    )
    # Queries labelled the other way round: nothing relevant is ever near.
    flipped = fs.index.retrieval_metrics(index, index.vectors, [1, 1, 1, 0, 0, 0], k=2)
    assert flipped["precision_at_1"] == 0.0 and flipped["mean_average_precision_at_r"] == 0.0


def test_needs_labels():
    index = fs.EmbeddingIndex(1)
    index.add(torch.zeros(3, 1))
    with pytest.raises(EmbeddingIndexError, match="labels"):
        fs.index.retrieval_metrics(index)


@pytest.mark.parametrize("k", [0, -3, 2.0, True, "5"])
def test_k_must_be_a_positive_int(k):
    index = fs.EmbeddingIndex(1)
    index.add(torch.tensor([[0.0], [1.0], [2.0]]), labels=[0, 0, 1])
    with pytest.raises(EmbeddingIndexError, match="k must be an int >= 1"):
        fs.index.retrieval_metrics(index, k=k)


def test_query_arguments_are_checked():
    index = fs.EmbeddingIndex(1)
    index.add(torch.tensor([[0.0], [1.0], [2.0]]), labels=[0, 0, 1])
    q = torch.tensor([[0.1], [1.9]])
    with pytest.raises(InputShapeError, match="labels must be 1-D with 2 entries"):
        fs.index.retrieval_metrics(index, q, [0, 1, 1], k=1)
    with pytest.raises(EmbeddingIndexError, match="labels must be >= 0"):
        fs.index.retrieval_metrics(index, q, [0, -2], k=1)
    with pytest.raises(EmbeddingIndexError, match="must be integers"):
        fs.index.retrieval_metrics(index, q, [0.0, 1.0], k=1)
    with pytest.raises(InputShapeError, match="queries have dimension 2"):
        fs.index.retrieval_metrics(index, torch.zeros(2, 2), [0, 1], k=1)
    # -1: a query without a label, left out of the means like a lone one.
    scores = fs.index.retrieval_metrics(index, q, [0, -1], k=1)
    assert scores["num_queries"] == 1 and scores["precision_at_1"] == 1.0
