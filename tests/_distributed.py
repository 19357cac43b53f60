"""Run a test's worker on several torch.distributed ranks (gloo, one machine), never forever."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

#: How long one collective may wait for the other ranks before it fails instead of hanging.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


@contextlib.contextmanager
def gloo_group(init_method: str, rank: int, world_size: int) -> Iterator[None]:
    """Join the test's process group for the ``with`` block.

    A file store has no server rank that must outlive the others. The group is not destroyed
    at the end: on torch 2.6, ``destroy_process_group`` was seen to wait forever for a rank
    that had already exited; the process's exit releases it instead.
    """
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    yield
    dist.barrier()  # no rank leaves while another still needs it for a collective


def _run_then_exit(rank: int, worker: Callable[..., None], *args: Any) -> None:
    """Run the worker; once it has succeeded, leave at once.

    The process group is never destroyed (see :func:`gloo_group`), and at a normal exit its
    C++ threads were seen, under load, to be torn down while still running ("terminate called
    without an active exception", SIGABRT). A worker that has passed has nothing left to do, so
    it exits without running destructors.
    """
    import os
    import sys

    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(
    worker: Callable[..., None],
    args: tuple[Any, ...],
    nprocs: int,
    tmp_path: Path,
    deadline: float = 240.0,
) -> None:
    """Run ``worker(rank, init_method, *args)`` on ``nprocs`` processes; fail, not hang, if they
    have not all finished after ``deadline`` seconds."""
    import torch.multiprocessing as mp

    init_method = f"file://{tmp_path / 'dist-store'}"
    context = mp.spawn(_run_then_exit, args=(worker, init_method, *args), nprocs=nprocs, join=False)
    end = time.monotonic() + deadline
    while not context.join(timeout=2):
        if time.monotonic() > end:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{nprocs} ranks did not finish within {deadline:.0f} s")
