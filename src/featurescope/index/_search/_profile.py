"""Where a search's time goes (product, selection, re-rank) and what it touched, for the
benchmark and the tests.

Off by default, when a phase or a count costs one global read. Inside :func:`time_breakdown`
each phase adds its wall time, summed over worker threads (so it is CPU-thread time, not
elapsed time), :func:`count` adds up a quantity and :func:`peak` keeps its largest value: tests
observe what a search did (rows scored, block sizes) without replacing any of its functions.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

__all__ = ["count", "peak", "phase", "time_breakdown"]

_lock = threading.Lock()
_totals: dict[str, float] | None = None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the time of the block to ``name`` while a breakdown is being taken."""
    if _totals is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        count(name, time.perf_counter() - start)


def count(name: str, value: float) -> None:
    """Add ``value`` to ``name`` while a breakdown is being taken."""
    if _totals is None:
        return
    with _lock:
        if _totals is not None:
            _totals[name] = _totals.get(name, 0.0) + value


def peak(name: str, value: float) -> None:
    """Keep the largest ``value`` seen under ``name`` while a breakdown is being taken."""
    if _totals is None:
        return
    with _lock:
        if _totals is not None:
            _totals[name] = max(_totals.get(name, value), value)


@contextlib.contextmanager
def time_breakdown() -> Iterator[dict[str, float]]:
    """Collect per-phase seconds and counts of the searches run inside the block into the
    dict yielded."""
    global _totals
    totals: dict[str, float] = {}
    with _lock:
        _totals = totals
    try:
        yield totals
    finally:
        with _lock:
            _totals = None
