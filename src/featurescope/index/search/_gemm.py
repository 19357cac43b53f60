"""The matrix product of the fast pass, on whichever CPU backend is fastest on this machine.

Three backends compute the scores ``norms − 2 · q @ tile.T``:

- ``torch``: float32 ``sgemm`` through torch's BLAS (MKL or OpenBLAS);
- ``numpy``: float32 ``sgemm`` through numpy's bundled OpenBLAS;
- ``bf16``: bfloat16 inputs, float32 accumulation, bfloat16 output, through torch (oneDNN),
  which runs on AMX or AVX-512-BF16 units where the processor has them and is slow where it
  has not. Its rounding is larger and proven too: the output rounding is folded into each
  score (:data:`BF16_OUTPUT`), the rest into the query's error bound (see ``_kernel``).

Which is fastest depends on the processor and the shapes, so the first large search for a
vector length times all three on one tile of its own shape and keeps the fastest; ``bf16``
must win by :data:`BF16_MARGIN`, for its wider bound sends a few more candidates to the
float64 re-rank (``FEATURESCOPE_GEMM=torch|numpy|bf16`` fixes the choice). Inside worker
threads each runs single-threaded (see ``_parallel``); threadpoolctl, which holds numpy's BLAS
at one thread, is a declared dependency, so every install measures and may pick any.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BF16_LOWER",
    "BF16_OUTPUT",
    "PRODUCT_DTYPE",
    "choose_backend",
    "chosen_backends",
    "scores_into",
]

_chosen: dict[int, str] = {}
#: The faster float32 backend per vector length, for searches that should not use ``bf16``.
_chosen_float: dict[int, str] = {}
_chosen_lock = threading.Lock()
#: Searches below this many multiply-adds are not worth timing the backends for.
_TUNE_ABOVE = 2e9
#: ``bf16`` is chosen only when it computes a tile's scores this many times faster.
BF16_MARGIN = 1.25
#: Bound on the relative rounding of a bfloat16 product's output (round to nearest, 2⁻⁸),
#: doubled as a margin against kernels we cannot see.
BF16_OUTPUT = 2.0 * 2.0**-8
#: What each bfloat16 product ``p`` is raised by, ``p + BF16_LOWER·|p|``, in bfloat16: the
#: sum's own rounding (``u = 2⁻⁸``, doubled) can take back at most ``2u·|p|(1 + BF16_LOWER)``,
#: so the stored value is still at least ``p + BF16_OUTPUT·|p|``.
BF16_LOWER = (BF16_OUTPUT + 2.0 * 2.0**-8) / (1.0 - 2.0 * 2.0**-8)
#: The dtype each backend multiplies in.
PRODUCT_DTYPE = {"torch": torch.float32, "numpy": torch.float32, "bf16": torch.bfloat16}
#: The backends the race times. numpy's OpenBLAS cannot be held at one thread for a worker
#: alone (only process-wide), so ``numpy`` runs only when chosen explicitly.
RACED = ("torch", "bf16")


def scores_into(q: Tensor, tile: Tensor, norms: Tensor, out: Tensor, backend: str) -> None:
    """``out = norms − 2 · q @ tile.T`` in float32 (``out`` contiguous).

    For ``bf16`` (``q`` and ``tile`` in bfloat16) the product ``p`` is rounded to bfloat16,
    and each score is lowered by (at least) its own rounding bound: ``out = norms − 2p'`` with
    ``p' ≥ p + β|p|``, ``β =`` :data:`BF16_OUTPUT` (see :data:`BF16_LOWER`). Two passes over
    the block: the raise in bfloat16, then one float32 sum.
    """
    if backend == "bf16":
        p = torch.mm(q, tile.T)
        p.add_(p.abs(), alpha=BF16_LOWER)
        torch.add(norms, p, alpha=-2.0, out=out)
    elif backend == "numpy":
        np.matmul(q.numpy(), tile.numpy().T, out=out.numpy())
        torch.add(norms, out, alpha=-2, out=out)
    else:
        torch.addmm(norms, q, tile.T, beta=1, alpha=-2, out=out)


def _race(fns: dict[str, Any], rounds: int = 5) -> dict[str, float]:
    """Best time of each of ``fns``, run alternately so that noise falls on all alike.

    One untimed call each first: oneDNN builds its kernel on the first product of a shape.
    """
    for fn in fns.values():
        fn()
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


def choose_backend(
    q: Tensor,
    sample: Callable[[], tuple[Tensor, Tensor]],
    rows: int,
    nb: int,
    allow_low: bool = True,
) -> str:
    """The fastest backend for single-threaded products of ``rows × d`` queries by a tile.

    Call from a single-threaded context (:func:`~._parallel.single_threaded_ops`); the answer
    is remembered per vector length. ``sample()`` gives a float32 gallery tile and its norms
    (only called when the backends are timed); ``nb`` is the number of rows searched;
    ``allow_low=False`` picks the faster float32 backend (a forced choice still wins).
    """
    forced = os.environ.get("FEATURESCOPE_GEMM", "").lower()
    if forced in PRODUCT_DTYPE:
        return forced
    dim = q.shape[1]
    with _chosen_lock:
        if dim in _chosen:
            return _chosen[dim] if allow_low else _chosen_float[dim]
    work = float(q.shape[0]) * nb * dim
    if work < _TUNE_ABOVE or q.device.type != "cpu":
        return "torch"
    tile, norms = sample()
    # A tile of the search's own shape: which BLAS is faster depends on it and on the processor.
    qt = q[: min(rows, 256)].contiguous()
    tile = tile.contiguous()
    out = torch.empty(qt.shape[0], tile.shape[0], dtype=torch.float32)
    inputs = {dt: (qt.to(dt), tile.to(dt)) for dt in set(PRODUCT_DTYPE.values())}
    timing = _race(
        {
            b: lambda b=b: scores_into(*inputs[PRODUCT_DTYPE[b]], norms, out, b)
            for b in RACED
        }
    )
    timing["bf16"] *= BF16_MARGIN
    best = min(timing, key=lambda b: timing[b])
    best_float = "torch"
    with _chosen_lock:
        _chosen_float.setdefault(dim, best_float)
        chosen = _chosen.setdefault(dim, best)
        return chosen if allow_low else _chosen_float[dim]
