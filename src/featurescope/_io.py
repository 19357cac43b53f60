"""Atomic file writes: a crash mid-write never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _read_umask() -> int:
    # os.umask can only be read by setting it; do that once, before any thread writes files.
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _default_mode(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777  # keep a replaced file's permissions
    except FileNotFoundError:
        return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The temporary file lives in the same directory so that :func:`os.replace` is a rename on
    one file system. On any exception the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, _default_mode(target))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that atomically replaces ``path`` when closed cleanly.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_open(d / "a.txt") as fh:
        ...     _ = fh.write("hello")
        >>> (d / "a.txt").read_text()
        'hello'
    """
    if not any(flag in mode for flag in "wax"):
        raise ValueError(f"atomic_open writes files; mode must contain 'w', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
