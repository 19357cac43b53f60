"""The matrix product of the fast pass: small backend objects, one chosen per search.

Each backend computes the scores ``norms − 2 · q @ tile.T`` of a query tile against a gallery
tile (in the style of einops' ``_backends.py``: a small class per backend, looked up once, no
string switches in the kernel):

- :class:`Float32`: float32 ``sgemm`` through torch's BLAS (MKL or OpenBLAS);
- :class:`NumpyFloat32`: float32 ``sgemm`` through numpy's bundled OpenBLAS, single-threaded on
  the calling worker without changing any thread setting (see ``_openblas``);
- :class:`BFloat16`: bfloat16 inputs, float32 accumulation, bfloat16 output, through torch
  (oneDNN), which runs on AMX or AVX-512-BF16 units where the processor has them and is slow
  where it has not. Its rounding is larger and proven too: the output rounding is folded into
  each score (:data:`BF16_OUTPUT`), the rest into the query's error bound (see ``_metric``).

Which is fastest depends on the processor and the shapes, so with ``backend="auto"`` the first
large search for a vector length times the three on one tile of its own shape, on a worker
like those that will run it, and keeps the fastest; bfloat16 must win by ``race_margin``, for
its wider bound sends a few more candidates to the float64 re-rank. Where the loaded OpenBLAS
has no single-threaded entry point (see ``_openblas``), :class:`NumpyFloat32` multiplies at
OpenBLAS's process-wide thread count, and it joins the race only when that count is already
1 (``OPENBLAS_NUM_THREADS=1``, the caller's choice).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from featurescope.index._search._config import SearchConfig
from featurescope.index._search._openblas import SMALL, openblas_sgemm

__all__ = [
    "BACKENDS",
    "BF16_LOWER",
    "BF16_OUTPUT",
    "FLOAT32",
    "Backend",
    "choose_backend",
    "chosen_backends",
]

#: Bound on the relative rounding of a bfloat16 product's output (round to nearest, 2⁻⁸),
#: doubled as a margin against kernels we cannot see.
BF16_OUTPUT = 2.0 * 2.0**-8
#: What each bfloat16 product ``p`` is raised by, ``p + BF16_LOWER·|p|``, in bfloat16: the
#: sum's own rounding (``u = 2⁻⁸``, doubled) can take back at most ``2u·|p|(1 + BF16_LOWER)``,
#: so the stored value is still at least ``p + BF16_OUTPUT·|p|``.
BF16_LOWER = (BF16_OUTPUT + 2.0 * 2.0**-8) / (1.0 - 2.0 * 2.0**-8)


class Backend:
    """One way to compute a score block; see the module docstring."""

    #: The name :class:`SearchConfig` and :attr:`SearchResult.backend` use.
    name: ClassVar[str]
    #: The dtype the operands are multiplied in.
    dtype: ClassVar[torch.dtype] = torch.float32

    @property
    def low_precision(self) -> bool:
        """Whether the operands are rounded below float32 (a wider bound)."""
        return self.dtype != torch.float32

    def scores_into(self, q: Tensor, tile: Tensor, norms: Tensor, out: Tensor) -> None:
        """``out = norms − 2 · q @ tile.T`` in float32 (``out`` contiguous)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


class Float32(Backend):
    name = "float32"

    def scores_into(self, q: Tensor, tile: Tensor, norms: Tensor, out: Tensor) -> None:
        torch.addmm(norms, q, tile.T, beta=1, alpha=-2, out=out)


class NumpyFloat32(Backend):
    name = "numpy"

    def scores_into(self, q: Tensor, tile: Tensor, norms: Tensor, out: Tensor) -> None:
        sgemm = openblas_sgemm()
        if sgemm is None:
            np.matmul(q.numpy(), tile.numpy().T, out=out.numpy())
            torch.add(norms, out, alpha=-2, out=out)
        elif q.shape[0] >= _FEWEST_ROWS and q.shape[0] * tile.shape[0] * q.shape[1] > SMALL:
            # The norms first, then ``beta = 1``: one pass over the block fewer than a product
            # (which zeroes it) followed by a sum, and the same rounding as ``addmm``.
            out.copy_(norms.expand_as(out))
            sgemm(_rows(q), _rows(tile), out, alpha=-2.0, beta=1.0)
        else:
            FLOAT32.scores_into(q, tile, norms, out)


#: Fewest query rows for OpenBLAS's batched product: its ``sgemm`` driver packs the whole
#: gallery tile and fills micro-kernels four rows wide, so one to three queries (latency) run
#: several times faster as torch's product, which reads the tile once.
_FEWEST_ROWS = 4


def _rows(x: Tensor) -> Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


class BFloat16(Backend):
    name = "bfloat16"
    dtype = torch.bfloat16

    def scores_into(self, q: Tensor, tile: Tensor, norms: Tensor, out: Tensor) -> None:
        """The product ``p`` is rounded to bfloat16, and each score is lowered by (at least)
        its own rounding bound: ``out = norms − 2p'`` with ``p' ≥ p + β|p|``, ``β =``
        :data:`BF16_OUTPUT` (see :data:`BF16_LOWER`). Two passes over the block: the raise in
        bfloat16, then one float32 sum."""
        p = torch.mm(q, tile.T)
        p.add_(p.abs(), alpha=BF16_LOWER)
        torch.add(norms, p, alpha=-2.0, out=out)


FLOAT32: Backend = Float32()
#: The backends by name.
BACKENDS: dict[str, Backend] = {b.name: b for b in (FLOAT32, NumpyFloat32(), BFloat16())}
_RACED = ("float32", "bfloat16")


def _raced() -> tuple[str, ...]:
    """The backends to time: numpy's where it runs single-threaded on a worker (see
    ``_openblas``), or where the caller's process holds OpenBLAS at one thread anyway."""
    if openblas_sgemm() is not None:
        return (*_RACED, "numpy")
    try:
        import threadpoolctl  # type: ignore[import-untyped]
    except ImportError:
        return _RACED
    blas = threadpoolctl.threadpool_info()
    numpy_blas = [i for i in blas if i.get("user_api") == "blas" and "numpy" in i["filepath"]]
    if numpy_blas and all(i["num_threads"] == 1 for i in numpy_blas):
        return (*_RACED, "numpy")
    return _RACED


Timer = Callable[[dict[str, Callable[[], None]]], dict[str, float]]

_chosen: dict[int, str] = {}
_chosen_lock = threading.Lock()


def race(fns: dict[str, Callable[[], None]], rounds: int = 5) -> dict[str, float]:
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
    """The backend the race chose so far for each vector length (for benchmarks and reports)."""
    with _chosen_lock:
        return dict(_chosen)


def known_backend(
    dim: int, config: SearchConfig, allow_low: bool = True, chosen: dict[int, str] | None = None
) -> Backend | None:
    """The backend named by ``config`` or chosen by an earlier race for ``dim`` (``None``: not
    raced yet); bfloat16 gives way to float32 where ``allow_low`` is false."""
    if config.backend != "auto":
        name: str | None = config.backend
    else:
        with _chosen_lock:
            name = (_chosen if chosen is None else chosen).get(dim)
    if name is None:
        return None
    backend = BACKENDS[name]
    return FLOAT32 if backend.low_precision and not allow_low else backend


def choose_backend(
    q: Tensor,
    sample: Callable[[], tuple[Tensor, Tensor]],
    rows: int,
    nb: int,
    config: SearchConfig,
    allow_low: bool = True,
    *,
    timer: Timer = race,
    chosen: dict[int, str] | None = None,
) -> Backend:
    """The backend for single-threaded products of ``rows × d`` queries by a tile.

    Call from a single-threaded worker; the race's answer is remembered per vector length (in
    ``chosen``, the process-wide record by default). ``sample()`` gives a float32 gallery tile
    and its norms (only called when the backends are timed); ``nb`` is the number of rows
    searched; ``allow_low=False`` keeps float32 (see :func:`known_backend`).
    """
    dim = q.shape[1]
    known = known_backend(dim, config, allow_low, chosen)
    if known is not None:
        return known
    record = _chosen if chosen is None else chosen
    work = float(q.shape[0]) * nb * dim
    if work < config.race_above or q.device.type != "cpu":
        return FLOAT32
    tile, norms = sample()
    # A tile of the search's own shape: which product is faster depends on it and on the chip.
    qt = q[: min(rows, 256)].contiguous()
    tile = tile.contiguous()
    out = torch.empty(qt.shape[0], tile.shape[0], dtype=torch.float32)
    raced = _raced()
    inputs = {b: (qt.to(BACKENDS[b].dtype), tile.to(BACKENDS[b].dtype)) for b in raced}

    def product(name: str) -> Callable[[], None]:
        return lambda: BACKENDS[name].scores_into(*inputs[name], norms, out)

    timing = timer({name: product(name) for name in raced})
    timing["bfloat16"] *= config.race_margin
    best = min(timing, key=lambda b: timing[b])
    with _chosen_lock:
        kept = record.setdefault(dim, best)
    chosen_backend = BACKENDS[kept]
    return FLOAT32 if chosen_backend.low_precision and not allow_low else chosen_backend
