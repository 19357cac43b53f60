"""Run a search's CPU work on its own worker threads, each doing single-threaded operations.

Two threads that each run single-threaded operations keep two cores busy without ever meeting
at a parallel barrier; one thread running two-thread operations stalls at every barrier when
another process holds a core. A search has many small operations, so it splits its queries (or,
for few queries, its gallery) over workers it starts itself.

Only the workers are made single-threaded, and only through settings local to a thread: OpenMP's
``omp_set_num_threads`` (a per-thread setting) and MKL's ``mkl_set_num_threads_local``.
``torch.set_num_threads`` is never called: besides
the calling thread it sets the default every thread that starts later inherits, so a data
loader started during a search would run on one thread for good. The caller's and every other
thread's torch and BLAS settings stay as they were. Where a library offers no such setting, its
operations in the workers keep their default thread count: slower on a busy machine, never
different in result. numpy's OpenBLAS has none (its ``openblas_set_num_threads_local`` sets the
process-wide count); its product runs single-threaded on a worker through another door instead
(``_openblas``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Concatenate, ParamSpec, Protocol, TypeVar

import torch

__all__ = [
    "caller_threads",
    "on_worker",
    "run_beside",
    "run_in_threads",
    "thread_local_setters",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")
#: Marks the threads made single-threaded here (they run nested work inline).
_local = threading.local()


class _OnDevice(Protocol):
    @property
    def device(self) -> torch.device: ...


_S = TypeVar("_S", bound=_OnDevice)


@functools.cache
def thread_local_setters() -> tuple[Callable[[int], object], ...]:
    """The thread-local thread-count setters found in the loaded libraries (looked up once)."""
    found: list[Callable[[int], object]] = []
    libraries: list[ctypes.CDLL] = []
    # The process's own symbols (POSIX); Windows has no such handle and finds none.
    with contextlib.suppress(OSError, TypeError):
        libraries.append(ctypes.CDLL(None))
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    # Another build layout may lack the file: OpenMP's setter can still be in the process.
    with contextlib.suppress(OSError):
        libraries.append(ctypes.CDLL(torch_lib))
    # MKL's C entry point; the lower-case names are its Fortran interface, which takes a pointer.
    for name in ("omp_set_num_threads", "MKL_Set_Num_Threads_Local"):
        fn = _first_symbol(libraries, name)
        if fn is not None:
            found.append(fn)
    return tuple(found)


def _first_symbol(libraries: list[ctypes.CDLL], name: str) -> Callable[[int], object] | None:
    for lib in libraries:
        fn = getattr(lib, name, None)
        if fn is not None:
            return fn  # type: ignore[no-any-return]
    return None


def _single_threaded_worker() -> None:
    """Thread initialiser: make this worker's operations single-threaded, for it alone."""
    # torch fills in a thread's OpenMP and MKL settings on its first parallel operation, from
    # the process default: do that first, so it does not undo the settings below.
    torch.get_num_threads()
    for set_local in thread_local_setters():
        set_local(1)
    _local.single = True


def _on_worker() -> bool:
    return bool(getattr(_local, "single", False))


def caller_threads() -> int:
    """``torch.get_num_threads()`` of the thread that entered the search.

    On a worker started by :func:`on_worker` that is the caller's count, read before the hand-
    over: the worker's own count is 1 (its operations are single-threaded), which would make a
    search run all its queries on one worker.
    """
    return int(getattr(_local, "caller_threads", 0)) or torch.get_num_threads()


def _as_worker(threads: int, call: Callable[[], _R]) -> _R:
    _local.caller_threads = threads
    return call()


def on_worker(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """Run a CPU object's method on a single-threaded worker (inline on one already).

    For a whole search, validation and result included: its many small operations would
    otherwise run at the caller's thread count, each waiting at a parallel barrier for a core
    another process holds. A GPU object's method runs on the caller's thread, where its
    current device and stream are.
    """

    @functools.wraps(method)
    def run(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self.device.type != "cpu" or _on_worker():
            return method(self, *args, **kwargs)
        call = functools.partial(method, self, *args, **kwargs)
        threads = torch.get_num_threads()
        with ThreadPoolExecutor(1, initializer=_single_threaded_worker) as pool:
            return pool.submit(_as_worker, threads, call).result()

    return run


def run_in_threads(tasks: list[Callable[[], None]]) -> None:
    """Run ``tasks`` on one fresh worker thread each, single-threaded; re-raise errors.

    A single task runs inline on a thread that is such a worker already.
    """
    if len(tasks) == 1 and _on_worker():
        tasks[0]()
        return
    with ThreadPoolExecutor(len(tasks), initializer=_single_threaded_worker) as pool:
        for future in [pool.submit(task) for task in tasks]:
            future.result()


def run_beside(tasks: list[Callable[[], None]]) -> None:
    """Run ``tasks[0]`` on this thread (a worker already) and the rest on fresh workers.

    On a busy machine every hand-over to another thread waits for a time slice: a worker that
    does a share itself saves one wait per call (latency of searches with few queries).
    """
    with ThreadPoolExecutor(max(1, len(tasks) - 1), initializer=_single_threaded_worker) as pool:
        futures = [pool.submit(task) for task in tasks[1:]]
        tasks[0]()
        for future in futures:
            future.result()
