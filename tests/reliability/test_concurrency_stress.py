"""Concurrency stress: searches beside two writers adding and removing, every answer checked
against a float64 brute force of the state it names (``SearchResult.version``)."""

from __future__ import annotations

import pytest
import torch

import featurescope as fs
from reliability._stress import check, run_stress

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("dtype", "metric"),
    [
        (torch.float32, "l2"),
        (torch.float16, "l2"),
        (torch.bfloat16, "l2"),
        (torch.float32, "cosine"),
        (torch.float32, "ip"),
    ],
)
def test_no_wrong_answer_beside_adds_and_removes(dtype, metric):
    index = fs.EmbeddingIndex(24, dtype=dtype, metric=metric)
    log = run_stress(index, seconds=3.0, readers=3, writers=2, k_max=8, seed=11)
    assert check(log, metric) == []
    assert len({version for version, *_ in log.answers}) >= 10
