"""The float32 matrix product of the fast pass, on whichever CPU BLAS is faster on this machine.

torch links MKL (or OpenBLAS); numpy's wheels bundle OpenBLAS, and which one is faster depends
on the processor and the shapes. Both are plain float32 ``sgemm``, so the rounding-error bound
of the search holds for either. Inside worker threads each runs single-threaded (see
``_parallel``); the first large search for a vector length times both on one tile and keeps
the faster (``FEATURESCOPE_GEMM=torch`` or ``numpy`` fixes the choice). threadpoolctl, which
holds numpy's BLAS at one thread, is a declared dependency, so every install measures and may
pick either.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["choose_backend", "chosen_backends", "scores_into"]

_chosen: dict[int, str] = {}
_chosen_lock = threading.Lock()
#: Searches below this many multiply-adds are not worth timing the backends for.
_TUNE_ABOVE = 2e9


def scores_into(q: Tensor, tile: Tensor, norms: Tensor, out: Tensor, backend: str) -> None:
    """``out = norms − 2 · q @ tile.T`` in float32 (``out`` contiguous)."""
    if backend == "numpy":
        np.matmul(q.numpy(), tile.numpy().T, out=out.numpy())
        torch.add(norms, out, alpha=-2, out=out)
    else:
        torch.addmm(norms, q, tile.T, beta=1, alpha=-2, out=out)


def _race(fns: dict[str, Any], rounds: int = 3) -> dict[str, float]:
    """Best time of each of ``fns``, run alternately so that noise falls on all alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def chosen_backends() -> dict[int, str]:
    """The backend chosen so far for each vector length (for benchmarks and reports)."""
    with _chosen_lock:
        return dict(_chosen)


def choose_backend(q: Tensor, tile: Tensor, norms: Tensor, rows: int, nb: int) -> str:
    """The faster backend for single-threaded products of ``rows × d`` queries by ``tile``.

    Call from a single-threaded context (:func:`~._parallel.single_threaded_ops`); the answer
    is remembered per vector length. ``nb`` is the number of rows the search goes through.
    """
    forced = os.environ.get("FEATURESCOPE_GEMM", "").lower()
    if forced in ("torch", "numpy"):
        return forced
    dim = q.shape[1]
    with _chosen_lock:
        if dim in _chosen:
            return _chosen[dim]
    work = float(q.shape[0]) * nb * dim
    if work < _TUNE_ABOVE or tile.dtype != torch.float32 or q.device.type != "cpu":
        return "torch"
    # A tile of the search's own shape: which BLAS is faster depends on it and on the processor.
    qt = q[: min(rows, 256)].contiguous()
    tile = tile.contiguous()
    out = torch.empty(qt.shape[0], tile.shape[0], dtype=torch.float32)
    timing = _race(
        {b: lambda b=b: scores_into(qt, tile, norms, out, b) for b in ("torch", "numpy")}
    )
    best = min(timing, key=lambda b: timing[b])
    with _chosen_lock:
        return _chosen.setdefault(dim, best)
