"""The matrix product of the fast pass, on whichever CPU backend is fastest on this machine.

Four backends compute the scores ``norms − 2 · q @ tile.T``:

- ``torch``: float32 ``sgemm`` through torch's BLAS (MKL or OpenBLAS);
- ``numpy``: float32 ``sgemm`` through numpy's bundled OpenBLAS;
- ``bf16``: bfloat16 inputs, float32 accumulation, bfloat16 output, through torch (oneDNN),
  which runs on AMX or AVX-512-BF16 units where the processor has them and is slow where it
  has not. Its rounding is larger and proven too: the output rounding is folded into each
  score (:data:`BF16_OUTPUT`), the rest into the query's error bound (see ``_kernel``);
- ``int8``: rows quantized to integers in ``[−63, 63]`` with one float32 scale each
  (:class:`QuantizedRows`), an int32 product (``torch._int_mm``, oneDNN), then scaled. The
  product is exact, so the bound only covers the quantization, which is measured. It is the
  backend that can beat float32 on processors with AVX2 but no bfloat16 units. Seven bits,
  not eight: oneDNN's AVX2 kernel adds pairs of 8-bit products in saturating 16-bit
  arithmetic, which overflows at full range (measured, with ``ONEDNN_MAX_CPU_ISA=AVX2``), and
  ``_int_mm`` is wrong for vectors of length 1. So the product is also checked against an
  exact integer product on worst-case operands once per vector length
  (:func:`int8_is_exact`), and ``int8`` is never used where that check fails.

Which is fastest depends on the processor and the shapes, so the first large search for a
vector length times them all on one tile of its own shape and keeps the fastest; ``bf16`` and
``int8`` must win by :data:`LOW_PRECISION_MARGIN`, for their wider bounds send more candidates
to the float64 re-rank (``FEATURESCOPE_GEMM=torch|numpy|bf16|int8`` fixes the choice). Inside worker
threads each runs single-threaded (see ``_parallel``); threadpoolctl, which holds numpy's BLAS
at one thread, is a declared dependency, so every install measures and may pick any.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BF16_OUTPUT",
    "PRODUCT_DTYPE",
    "QuantizedRows",
    "choose_backend",
    "chosen_backends",
    "int8_is_exact",
    "quantize_rows",
    "scores_into",
]

_chosen: dict[int, str] = {}
_chosen_lock = threading.Lock()
#: Searches below this many multiply-adds are not worth timing the backends for.
_TUNE_ABOVE = 2e9
#: How many times faster than float32 a backend's tile must be to be chosen (its wider bound
#: costs re-rank work): ``int8``'s is wider than ``bf16``'s.
LOW_PRECISION_MARGIN = {"bf16": 1.25, "int8": 1.5}
#: Bound on the relative rounding of a bfloat16 product's output (round to nearest, 2⁻⁸),
#: doubled as a margin against kernels we cannot see.
BF16_OUTPUT = 2.0 * 2.0**-8
#: The dtype each backend multiplies in.
PRODUCT_DTYPE = {
    "torch": torch.float32,
    "numpy": torch.float32,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
}


#: Largest magnitude of a quantized value (see the module docstring for why not 127).
QMAX = 63


class QuantizedRows(NamedTuple):
    """Rows ``scales[i] · values[i]``: int8 values in ``[−QMAX, QMAX]``, float32 scales."""

    values: Tensor  # [n, d] int8
    scales: Tensor  # [n] float32

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def device(self) -> torch.device:
        return self.values.device

    def take(self, rows: Tensor) -> QuantizedRows:
        """The rows ``rows`` (indices or a slice object's result)."""
        return QuantizedRows(self.values.index_select(0, rows), self.scales.index_select(0, rows))

    def part(self, start: int, stop: int) -> QuantizedRows:
        return QuantizedRows(self.values[start:stop], self.scales[start:stop])

    def exact(self) -> Tensor:
        """``scales[i] · values[i]`` in float64 (exact: an 8-bit integer times a float32)."""
        return self.values.to(torch.float64) * self.scales.to(torch.float64)[:, None]


def quantize_rows(rows: Tensor) -> QuantizedRows:
    """Round each row to integers with the float32 scale ``max|row| / QMAX`` (any float in)."""
    scale = (rows.abs().amax(1) / QMAX).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = torch.round(rows / scale.to(rows.dtype)[:, None]).clamp_(-QMAX, QMAX)
    return QuantizedRows(values.to(torch.int8), scale)


_int8_checked: dict[int, bool] = {}


def int8_is_exact(dim: int) -> bool:
    """Whether ``torch._int_mm`` gives the exact product of ``[−QMAX, QMAX]`` rows of ``dim``.

    Checked once per length on the operands most likely to overflow a saturating kernel
    (every value ±QMAX, in every sign pattern) and on random ones.
    """
    with _chosen_lock:
        if dim in _int8_checked:
            return _int8_checked[dim]
    gen = torch.Generator().manual_seed(dim)
    ones = torch.ones(dim, dtype=torch.int64)
    alternating = torch.ones(dim, dtype=torch.int64)
    alternating[1::2] = -1
    patterns = torch.stack([ones, -ones, alternating, -alternating]) * QMAX
    random = torch.randint(-QMAX, QMAX + 1, (13, dim), generator=gen)
    a = torch.cat([patterns, random]).to(torch.int8)
    b = torch.cat([patterns, random.flip(0), random]).to(torch.int8)
    try:
        got = torch._int_mm(a, b.T).to(torch.int64)
        exact = bool(torch.equal(got, a.to(torch.int64) @ b.to(torch.int64).T))
    except RuntimeError:  # a build without an int8 product on this device
        exact = False
    with _chosen_lock:
        return _int8_checked.setdefault(dim, exact)


def scores_into(
    q: Tensor | QuantizedRows,
    tile: Tensor | QuantizedRows,
    norms: Tensor,
    out: Tensor,
    backend: str,
) -> None:
    """``out = norms − 2 · q @ tile.T`` in float32 (``out`` contiguous).

    For ``int8`` (``q`` and ``tile`` :class:`QuantizedRows`) the int32 product is exact and
    the scales multiply it: ``out = norms + (−2 · tile.scales · p) · q.scales``.

    For ``bf16`` (``q`` and ``tile`` in bfloat16) the product ``p`` is rounded to bfloat16,
    and each score is lowered by its own rounding bound: ``out = norms − 2 (p + β|p|)`` with
    ``β =`` :data:`BF16_OUTPUT`, computed as ``norms − 2(1−β)p − 4β·max(p, 0)``.
    """
    if isinstance(q, QuantizedRows) or isinstance(tile, QuantizedRows):
        assert isinstance(q, QuantizedRows)
        assert isinstance(tile, QuantizedRows)
        out.copy_(torch._int_mm(q.values, tile.values.T))
        out.mul_(tile.scales * -2.0)
        torch.addcmul(norms, out, q.scales[:, None], out=out)
    elif backend == "bf16":
        assert isinstance(q, Tensor)
        assert isinstance(tile, Tensor)
        p = torch.mm(q, tile.T)
        out.copy_(p)
        positive = p.clamp_(min=0)
        torch.add(norms, out, alpha=-2.0 * (1.0 - BF16_OUTPUT), out=out)
        out.add_(positive, alpha=-4.0 * BF16_OUTPUT)
    elif backend == "numpy":
        assert isinstance(q, Tensor)
        assert isinstance(tile, Tensor)
        np.matmul(q.numpy(), tile.numpy().T, out=out.numpy())
        torch.add(norms, out, alpha=-2, out=out)
    else:
        assert isinstance(q, Tensor)
        assert isinstance(tile, Tensor)
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


def choose_backend(
    q: Tensor, sample: Callable[[], tuple[Tensor, Tensor]], rows: int, nb: int
) -> str:
    """The fastest backend for single-threaded products of ``rows × d`` queries by a tile.

    Call from a single-threaded context (:func:`~._parallel.single_threaded_ops`); the answer
    is remembered per vector length. ``sample()`` gives a float32 gallery tile and its norms
    (only called when the backends are timed); ``nb`` is the number of rows searched.
    """
    forced = os.environ.get("FEATURESCOPE_GEMM", "").lower()
    dim = q.shape[1]
    if forced in PRODUCT_DTYPE:
        return "torch" if forced == "int8" and not int8_is_exact(dim) else forced
    with _chosen_lock:
        if dim in _chosen:
            return _chosen[dim]
    work = float(q.shape[0]) * nb * dim
    if work < _TUNE_ABOVE or q.device.type != "cpu":
        return "torch"
    tile, norms = sample()
    # A tile of the search's own shape: which BLAS is faster depends on it and on the processor.
    qt = q[: min(rows, 256)].contiguous()
    tile = tile.contiguous()
    out = torch.empty(qt.shape[0], tile.shape[0], dtype=torch.float32)
    inputs: dict[torch.dtype, tuple[Any, Any]] = {
        dt: (qt.to(dt), tile.to(dt)) for dt in (torch.float32, torch.bfloat16)
    }
    inputs[torch.int8] = (quantize_rows(qt), quantize_rows(tile))
    candidates = [b for b in PRODUCT_DTYPE if b != "int8" or int8_is_exact(dim)]
    timing = _race(
        {
            b: lambda b=b, dt=PRODUCT_DTYPE[b]: scores_into(*inputs[dt], norms, out, b)
            for b in candidates
        }
    )
    for b, margin in LOW_PRECISION_MARGIN.items():
        if b in timing:
            timing[b] *= margin
    best = min(timing, key=lambda b: timing[b])
    with _chosen_lock:
        return _chosen.setdefault(dim, best)
