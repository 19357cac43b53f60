"""Where a search's time goes: product, selection, re-rank (for the benchmark).

Off by default, when a phase costs one global read. Inside :func:`time_breakdown` each phase
adds its wall time, summed over worker threads (so it is CPU-thread time, not elapsed time).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

__all__ = ["phase", "time_breakdown"]

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
        spent = time.perf_counter() - start
        with _lock:
            if _totals is not None:
                _totals[name] = _totals.get(name, 0.0) + spent


@contextlib.contextmanager
def time_breakdown() -> Iterator[dict[str, float]]:
    """Collect per-phase seconds of the searches run inside the block into the dict yielded."""
    global _totals
    totals: dict[str, float] = {}
    with _lock:
        _totals = totals
    try:
        yield totals
    finally:
        with _lock:
            _totals = None
