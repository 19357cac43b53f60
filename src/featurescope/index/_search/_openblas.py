"""OpenBLAS's float32 product on the calling thread alone, without changing any thread setting.

OpenBLAS built with pthreads (numpy's and scipy's wheels) has one process-wide thread count:
``openblas_set_num_threads``, its ``_local`` variant and threadpoolctl all change it for every
thread, which a search must not do. Its batched product, though, hands each matrix of a batch
to one thread, and a batch of one matrix runs on the thread that calls it, whatever the count.
So the index's workers each multiply with OpenBLAS single-threaded, side by side, through
``cblas_sgemm_batch`` with one matrix. On AMD processors that is about 30 % faster than MKL's
``sgemm`` (torch's) at one thread.

The entry point is looked up in the OpenBLAS the process has loaded (numpy's first), under
the symbol prefixes and suffixes of the scipy-openblas builds; where none has it (an older
OpenBLAS, or numpy on MKL), :func:`openblas_sgemm` returns ``None``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Any

from torch import Tensor

__all__ = ["SMALL", "BatchOfOne", "openblas_sgemm"]

#: Multiply-adds at or below which the batched entry point takes a small-matrix path, which
#: crashes in builds for several processors (seen in OpenBLAS 0.3.31): never called there.
SMALL = 100**3
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_PREFIXES = ("", "scipy_")
_SUFFIXES = ("", "64_", "_64")


class BatchOfOne:
    """``out = alpha · a @ b.T + beta · out`` through ``cblas_sgemm_batch`` with one matrix."""

    def __init__(self, fn: Any, integer: type[ctypes.c_int32] | type[ctypes.c_int64]) -> None:
        self._fn = fn
        self._int = integer

    def __call__(self, a: Tensor, b: Tensor, out: Tensor, alpha: float, beta: float) -> None:
        """All float32 CPU tensors with unit column stride; ``a @ b.T`` of more than
        :data:`SMALL` multiply-adds (``out`` ``[m, n]``, ``a`` ``[m, k]``, ``b`` ``[n, k]``)."""
        (m, k), n = a.shape, b.shape[0]
        one = self._int * 1
        pointers = ctypes.c_void_p * 1
        self._fn(
            ctypes.c_int(_ROW_MAJOR),
            (ctypes.c_int * 1)(_NO_TRANS),
            (ctypes.c_int * 1)(_TRANS),
            one(m),
            one(n),
            one(k),
            (ctypes.c_float * 1)(alpha),
            pointers(a.data_ptr()),
            one(a.stride(0)),
            pointers(b.data_ptr()),
            one(b.stride(0)),
            (ctypes.c_float * 1)(beta),
            pointers(out.data_ptr()),
            one(out.stride(0)),
            self._int(1),
            one(1),
        )


@functools.cache
def openblas_sgemm() -> BatchOfOne | None:
    """The single-threaded OpenBLAS product, or ``None`` where no loaded OpenBLAS offers one."""
    try:
        import threadpoolctl  # type: ignore[import-untyped]
    except ImportError:
        return None
    found = [i for i in threadpoolctl.threadpool_info() if i.get("internal_api") == "openblas"]
    # numpy's own first: it is loaded in every process that runs a search.
    found.sort(key=lambda i: "numpy" not in i["filepath"])
    for info in found:
        with contextlib.suppress(OSError):
            product = _batch_of_one(ctypes.CDLL(info["filepath"]))
            if product is not None:
                return product
    return None


def _batch_of_one(lib: ctypes.CDLL) -> BatchOfOne | None:
    for prefix in _PREFIXES:
        for suffix in _SUFFIXES:
            fn = getattr(lib, f"{prefix}cblas_sgemm_batch{suffix}", None)
            config = getattr(lib, f"{prefix}openblas_get_config{suffix}", None)
            if fn is None or config is None:
                continue
            config.restype = ctypes.c_char_p
            fn.restype = None
            wide = b"USE64BITINT" in (config() or b"")
            return BatchOfOne(fn, ctypes.c_int64 if wide else ctypes.c_int32)
    return None
