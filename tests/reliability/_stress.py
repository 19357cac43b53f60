"""Searches beside adds and removes, every answer checked against a float64 brute force of the
state it names (``SearchResult.version``)."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import featurescope as fs
from featurescope.errors import EmbeddingIndexError


@dataclass
class StressLog:
    """What the threads did: states by version, answers, and anything that went wrong."""

    states: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    answers: list[tuple[int, np.ndarray, int, fs.SearchResult]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    refused: int = 0  # searches refused because the state held fewer than k vectors (or none)


def _brute(
    vectors: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 k nearest, ties by the smaller id: the reference every answer must equal."""
    v, q = vectors.astype(np.float64), q.astype(np.float64)
    if metric == "l2":
        key = np.sqrt(((q[:, None, :] - v[None, :, :]) ** 2).sum(-1))
        shown = key
    elif metric == "ip":
        shown = q @ v.T
        key = -shown
    else:
        qn = np.linalg.norm(q, axis=1, keepdims=True)
        vn = np.linalg.norm(v, axis=1, keepdims=True)
        shown = (q / qn) @ (v / vn).T
        key = -shown
    order = np.lexsort((np.broadcast_to(ids, key.shape), key), axis=1)[:, :k]
    return np.take_along_axis(shown, order, 1), ids[order]


def run_stress(
    index: fs.EmbeddingIndex,
    *,
    seconds: float,
    readers: int = 2,
    writers: int = 1,
    k_max: int = 5,
    seed: int = 0,
) -> StressLog:
    """Run ``readers`` searching threads beside ``writers`` adding and removing, for
    ``seconds``; return the log (checked by :func:`check`)."""
    dim = index.dim
    log = StressLog()
    record_lock = threading.Lock()
    next_id = [10**6]
    stop = time.monotonic() + seconds

    def record() -> None:
        log.states[index.version] = (index.ids.numpy(), index.vectors.numpy())

    def new_rows(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray]:
        # Far from the origin and drifting, so the gallery's centre moves and is recomputed.
        drift = rng.normal(0, 30, size=dim)
        rows = (rng.normal(size=(m, dim)) + 100 + drift).astype(np.float32)
        ids = np.arange(next_id[0], next_id[0] + m, dtype=np.int64)
        next_id[0] += m
        return rows, ids

    def writer(wseed: int) -> None:
        rng = np.random.default_rng(wseed)
        try:
            while time.monotonic() < stop:
                with record_lock:
                    n = len(index)
                    if n < 4 * k_max or (n < 600 and rng.random() < 0.55):
                        rows, ids = new_rows(rng, int(rng.integers(1, max(2, n) + 1)))
                        index.add(rows, ids=ids, labels=ids % 7, metadata=[f"m{i}" for i in ids])
                    else:
                        present = index.ids.numpy()
                        # Sometimes everything, so the adds that follow re-centre the gallery
                        # at every doubling.
                        keep = 0 if rng.random() < 0.15 else int(rng.integers(k_max, n))
                        index.remove(rng.choice(present, n - keep, replace=False))
                    record()
        except Exception as exc:
            log.errors.append(f"writer: {exc!r}")

    def reader(rseed: int) -> None:
        rng = np.random.default_rng(rseed)
        try:
            while time.monotonic() < stop:
                nq = int(rng.choice([1, 3, 40]))
                rows = index.vectors.numpy()
                centre = rows.mean(0) if len(rows) and rng.random() < 0.2 else 100.0
                q = (rng.normal(0, 20, size=(nq, dim)) + centre).astype(np.float32)
                k = int(rng.integers(1, k_max + 1))
                try:
                    result = index.search(q, k)
                except EmbeddingIndexError as exc:
                    if "larger than" not in str(exc) and "empty" not in str(exc):
                        raise
                    log.refused += 1
                    continue
                assert result.version is not None
                log.answers.append((result.version, q, k, result))
        except Exception as exc:
            log.errors.append(f"reader: {exc!r}")

    with record_lock:
        rows, ids = new_rows(np.random.default_rng(seed), 8 * k_max)
        index.add(rows, ids=ids, labels=ids % 7, metadata=[f"m{i}" for i in ids])
        record()
    # Switch threads every few microseconds (CPython's default is 5 ms), so that writers
    # land inside searches, which take well under a millisecond here.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=writer, args=(seed + 1 + i,)) for i in range(writers)]
    threads += [threading.Thread(target=reader, args=(seed + 100 + i,)) for i in range(readers)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    return log


def check(log: StressLog, metric: str) -> list[str]:
    """Every answer against the brute force of its state: ids, distances, labels, metadata."""
    wrong = list(log.errors)
    for version, q, k, result in log.answers:
        ids, vectors = log.states[version]
        want_d, want_i = _brute(vectors, ids, q, k, metric)
        got_i = result.ids.numpy()
        if not np.array_equal(got_i, want_i):
            wrong.append(f"version {version}: ids {got_i.tolist()} != {want_i.tolist()}")
            continue
        if not np.allclose(result.distances.numpy(), want_d, rtol=1e-9, atol=1e-9):
            wrong.append(f"version {version}: distances {result.distances} != {want_d}")
        if not torch.equal(result.labels, torch.from_numpy(want_i % 7)):
            wrong.append(f"version {version}: labels {result.labels} for ids {want_i}")
        if result.metadata != [[f"m{i}" for i in row] for row in want_i.tolist()]:
            wrong.append(f"version {version}: metadata {result.metadata} for ids {want_i}")
    return wrong
