"""Atomic file writes: a crash mid-write never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
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


def new_dir_mode() -> int:
    """The mode ``os.mkdir`` would give a new folder under this process's umask."""
    return 0o777 & ~_UMASK


def _default_mode(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777  # keep a replaced file's permissions
    except FileNotFoundError:
        return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], *, exclusive: bool = False, keep: bool = False
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The temporary file lives in the same directory so that :func:`os.replace` is a rename on
    one file system. On any exception the temporary file is removed and ``path`` is untouched.

    Args:
        path: the file to write.
        exclusive: never replace an existing file: raise :class:`FileExistsError` at once if
            ``path`` exists, and at the end if one appeared meanwhile (``open(path, "x")``).
        keep: start the temporary file as a copy of ``path``'s current content, to append to.
    """
    target = Path(path)
    if exclusive and target.exists():
        raise FileExistsError(errno.EEXIST, "File exists", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if keep and target.is_file():
            shutil.copyfile(target, tmp)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, _default_mode(target))
        if exclusive:
            os.link(tmp, target)  # fails, rather than replaces, if the file appeared meanwhile
            tmp.unlink()
        else:
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that atomically replaces ``path`` when closed cleanly.

    The modes mean what they mean for :func:`open`, applied at once to the whole file: ``"w"``
    replaces it, ``"a"`` appends to its current content, ``"x"`` creates it and raises
    :class:`FileExistsError` if it exists; add ``"b"`` for bytes and ``"+"`` to read back.
    Readers see the old file or the new one, never a part.

    Raises:
        ValueError: a mode that does not write (``"r"``), or an invalid one.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_open(d / "a.txt") as fh:
        ...     _ = fh.write("hello")
        >>> (d / "a.txt").read_text()
        'hello'
    """
    kinds = [flag for flag in mode if flag in "rwax"]
    if (
        kinds not in (["w"], ["a"], ["x"])
        or set(mode) - set("waxbt+")
        or len(set(mode)) != len(mode)
    ):
        raise ValueError(
            f"atomic_open writes files: mode must hold one of 'w', 'a' or 'x' (with 'b', 't' or "
            f"'+'), got {mode!r}"
        )
    kind = kinds[0]
    # The temporary file is new and private: write it as "w" (or "a" onto the copy) and let
    # atomic_path give "x" its meaning at the rename.
    with (
        atomic_path(path, exclusive=kind == "x", keep=kind == "a") as tmp,
        open(tmp, mode.replace("x", "w"), **kwargs) as fh,
    ):
        yield fh
