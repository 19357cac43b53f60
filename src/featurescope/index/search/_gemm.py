"""The float32 matrix product of the fast pass, on whichever CPU BLAS is faster on this machine.

torch links MKL (or OpenBLAS); numpy's wheels bundle OpenBLAS, and which one is faster depends
on the processor (OpenBLAS is often ahead on AMD). Both are plain float32 ``sgemm``, so the
rounding-error bound of the search holds for either. Inside worker threads each runs
single-threaded; the first large search for a vector length times both on one tile and keeps
the faster (``FEATURESCOPE_GEMM=torch`` or ``numpy`` fixes the choice).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["blas_single_threaded", "choose_backend", "scores_into"]

_chosen: dict[int, str] = {}
#: Searches below this many multiply-adds are not worth timing the backends for.
_TUNE_ABOVE = 2e9


def scores_into(q: Tensor, tile: Tensor, norms: Tensor, out: Tensor, backend: str) -> None:
    """``out = norms − 2 · q @ tile.T`` in float32 (``out`` contiguous)."""
    if backend == "numpy":
        np.matmul(q.numpy(), tile.numpy().T, out=out.numpy())
        torch.add(norms, out, alpha=-2, out=out)
    else:
        torch.addmm(norms, q, tile.T, beta=1, alpha=-2, out=out)


def _threadpoolctl() -> Any:
    try:
        import threadpoolctl  # type: ignore[import-untyped]
    except ImportError:
        return None
    return threadpoolctl


@contextlib.contextmanager
def blas_single_threaded(backend: str) -> Iterator[None]:
    """Limit numpy's BLAS to one thread while worker threads use it."""
    tpc = _threadpoolctl() if backend == "numpy" else None
    if tpc is None:
        yield
        return
    with tpc.threadpool_limits(1, user_api="blas"):
        yield


def _time(fn: Any) -> float:
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def choose_backend(q: Tensor, search: Tensor, norms: Tensor, rows: int, cols: int) -> str:
    """The faster backend for single-threaded products of ``rows × d`` by ``d × cols`` tiles.

    Call from a single-threaded context; the answer is remembered per vector length.
    """
    forced = os.environ.get("FEATURESCOPE_GEMM", "").lower()
    if forced in ("torch", "numpy"):
        return forced if forced == "torch" or _threadpoolctl() is not None else "torch"
    dim = q.shape[1]
    if dim in _chosen:
        return _chosen[dim]
    work = float(q.shape[0]) * search.shape[0] * dim
    if work < _TUNE_ABOVE or _threadpoolctl() is None or search.dtype != torch.float32:
        return "torch"
    qt = q[: min(rows, 128)].contiguous()
    tile = search[: min(cols, 4096)]
    out = torch.empty(qt.shape[0], tile.shape[0], dtype=torch.float32)
    nt = norms[: tile.shape[0]]
    with blas_single_threaded("numpy"):
        timing = {
            b: _time(lambda b=b: scores_into(qt, tile, nt, out, b)) for b in ("torch", "numpy")
        }
    _chosen[dim] = min(timing, key=lambda b: timing[b])
    return _chosen[dim]
