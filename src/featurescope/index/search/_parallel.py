"""Run CPU work on threads whose torch operations are single-threaded.

Two threads that each run single-threaded operations keep two cores busy without ever meeting
at a parallel barrier; one thread running two-thread operations stalls at every barrier when
another process holds a core. A search has many small operations, so it splits its queries.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["run_in_threads", "single_threaded_ops"]

_lock = threading.Lock()
_depth = 0
_saved = 1


@contextlib.contextmanager
def single_threaded_ops() -> Iterator[None]:
    """Set ``torch.set_num_threads(1)`` for the duration; nested and concurrent uses are safe.

    The first entrant saves the thread count and the last to leave restores it, so searches
    running at the same time from different threads do not restore each other's settings.
    """
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.set_num_threads(_saved)


def run_in_threads(tasks: list[Callable[[], None]]) -> None:
    """Run ``tasks`` on one thread each, with single-threaded torch operations; re-raise errors."""
    with single_threaded_ops(), ThreadPoolExecutor(len(tasks)) as pool:
        for future in [pool.submit(task) for task in tasks]:
            future.result()
