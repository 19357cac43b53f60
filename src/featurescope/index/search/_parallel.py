"""Run CPU work on threads whose torch operations (and numpy's BLAS) are single-threaded.

Two threads that each run single-threaded operations keep two cores busy without ever meeting
at a parallel barrier; one thread running two-thread operations stalls at every barrier when
another process holds a core. A search has many small operations, so it splits its queries.

The thread settings are process-wide, so they are reference-counted: the first search to
enter saves the caller's settings, the last to leave restores them, and searches running at
the same time from several threads never restore one another's settings half-way.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

__all__ = ["caller_threads", "run_in_threads", "single_threaded_ops"]

_lock = threading.Lock()
_depth = 0
_saved = 1
_blas_limits: Any = None
_blas_controller: Any = None


def caller_threads() -> int:
    """The caller's ``torch.get_num_threads()``, even while a search holds it at 1."""
    with _lock:
        return _saved if _depth else torch.get_num_threads()


def _limit_blas() -> Any:
    """Limit the BLAS libraries (numpy's OpenBLAS) to one thread, OpenMP left alone.

    The controller, which scans the loaded libraries (a millisecond), is made once;
    ``select`` keeps only the BLAS libraries, so restoring never touches OpenMP (torch's
    thread count) the way ``threadpool_limits(user_api="blas")`` does.
    """
    global _blas_controller
    if _blas_controller is None:
        import threadpoolctl  # type: ignore[import-untyped]

        _blas_controller = threadpoolctl.ThreadpoolController().select(user_api="blas")
    return _blas_controller.limit(limits=1)


@contextlib.contextmanager
def single_threaded_ops() -> Iterator[None]:
    """Hold torch's and numpy's BLAS thread counts at 1; nested and concurrent uses are safe."""
    global _depth, _saved, _blas_limits
    with _lock:
        if _depth == 0:
            _saved = torch.get_num_threads()
            _blas_limits = _limit_blas()
            torch.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _blas_limits.restore_original_limits()
                _blas_limits = None
                torch.set_num_threads(_saved)


def run_in_threads(tasks: list[Callable[[], None]]) -> None:
    """Run ``tasks`` on one thread each, with single-threaded operations; re-raise errors."""
    with single_threaded_ops(), ThreadPoolExecutor(len(tasks)) as pool:
        for future in [pool.submit(task) for task in tasks]:
            future.result()
