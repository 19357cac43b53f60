"""SearchConfig: tuning passed by argument changes speed and memory, never a result."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import featurescope as fs
from featurescope.errors import EmbeddingIndexError
from featurescope.index._search._backends import chosen_backends
from test_index import brute_force, make_data


def test_config_is_frozen_validated_and_kept_by_the_index():
    config = fs.index.SearchConfig(backend="float32", threads=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gallery_tile = 8  # type: ignore[misc]
    index = fs.EmbeddingIndex(3, config=config)
    assert index.config is config
    assert fs.EmbeddingIndex(3).config == fs.index.SearchConfig()
    with pytest.raises(EmbeddingIndexError, match="backend must be one of"):
        fs.index.SearchConfig(backend="bf16")
    for bad in ({"gallery_tile": 0}, {"threads": 0}, {"merge_every": 1.5}, {"threads": True}):
        with pytest.raises(EmbeddingIndexError, match="must be"):
            fs.index.SearchConfig(**bad)
    with pytest.raises(EmbeddingIndexError, match="SearchConfig"):
        fs.EmbeddingIndex(3, config={"backend": "float32"})  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["random", "duplicates", "offset", "grid"]),
    metric=st.sampled_from(["l2", "cosine", "ip"]),
    gallery_tile=st.sampled_from([16, 64, 4096]),
    block_cells=st.sampled_from([1024, 2 * 2**20]),
    merge_every=st.integers(1, 16),
    rerank_bytes=st.sampled_from([64, 4 * 2**20]),
    threads=st.integers(1, 3),
    min_queries_per_worker=st.sampled_from([1, 16]),
    min_rows_per_worker=st.sampled_from([16, 4096]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_tuning_gives_the_default_result(
    kind,
    metric,
    gallery_tile,
    block_cells,
    merge_every,
    rerank_bytes,
    threads,
    min_queries_per_worker,
    min_rows_per_worker,
    seed,
):
    g, q, ids = make_data(kind, 700, 5, 12, seed)
    config = fs.index.SearchConfig(
        backend="float32",
        threads=threads,
        gallery_tile=gallery_tile,
        block_cells=block_cells,
        merge_every=merge_every,
        rerank_bytes=rerank_bytes,
        min_queries_per_worker=min_queries_per_worker,
        min_rows_per_worker=min_rows_per_worker,
    )
    tuned = fs.EmbeddingIndex(5, metric=metric, config=config, memory_budget=1 << 18)
    default = fs.EmbeddingIndex(5, metric=metric)
    for index in (tuned, default):
        index.add(g, ids=ids)
    for k in (1, 7):
        got, want = tuned.search(q, k), default.search(q, k)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.distances, want.distances)
    if metric == "l2":
        ref_d, ref_i = brute_force(g, ids, q, 7)
        assert torch.equal(got.ids, ref_i) and torch.equal(got.distances, ref_d)


def test_float32_backend_switches_the_race_off():
    # race_above=1 would time the backends on this search; backend="float32" does not.
    g = np.random.default_rng(0).standard_normal((3000, 37)).astype(np.float32)
    index = fs.EmbeddingIndex(37, config=fs.index.SearchConfig(backend="float32", race_above=1))
    index.add(g)
    result = index.search(g[:300], 3)
    assert result.backend == "float32"
    assert 37 not in chosen_backends()
    raced = fs.EmbeddingIndex(37, config=fs.index.SearchConfig(race_above=1))
    raced.add(g)
    assert raced.search(g[:300], 3).backend == chosen_backends()[37]


@pytest.mark.parametrize("kind", ["near", "offset", "grid"])
def test_numpy_backend_is_exact_on_every_path(kind):
    # OpenBLAS's batch of one for query tiles of 4 rows or more, torch's product for fewer,
    # gallery ranges split over workers for few queries, query ranges for many.
    g, q, ids = make_data(kind, 9000, 48, 64, 3)
    index = fs.EmbeddingIndex(48, config=fs.index.SearchConfig(backend="numpy", threads=2))
    index.add(g, ids=ids)
    ref_d, ref_i = brute_force(g, ids, q, 5)
    for rows in (slice(0, 1), slice(1, 4), slice(4, 20), slice(0, 64)):
        result = index.search(q[rows], 5)
        assert result.backend == "numpy"
        assert torch.equal(result.ids, ref_i[rows]) and torch.equal(result.distances, ref_d[rows])


def test_known_backend_names_or_remembers_and_never_forces_bfloat16():
    from featurescope.index._search._backends import known_backend

    auto = fs.index.SearchConfig()
    assert known_backend(5, auto, chosen={}) is None
    assert known_backend(5, auto, chosen={5: "numpy"}).name == "numpy"
    assert known_backend(5, auto, False, chosen={5: "bfloat16"}).name == "float32"
    assert known_backend(5, auto, True, chosen={5: "bfloat16"}).name == "bfloat16"
    named = fs.index.SearchConfig(backend="bfloat16")
    assert known_backend(5, named, False, chosen={}).name == "float32"
    assert known_backend(5, named, True, chosen={5: "numpy"}).name == "bfloat16"
