"""Folders featurescope writes whole (a saved ImageSearch), and how one is replaced safely.

A save may replace only a folder that featurescope wrote: its manifest names featurescope's
format, and it holds nothing the format does not name. Anything else at the path (a user's
photo folder that happens to hold a ``search.json``, or a saved search the user put files
into) is refused, never deleted. The replacement is one atomic exchange of two folders where
the file system allows it (Linux's ``renameat2(RENAME_EXCHANGE)``), so the path always holds
the old folder or the new one; saves to one path are serialised with a file lock; and the
temporary folders of a save that was killed are removed by the next save to that path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

from featurescope.errors import FeaturescopeError

__all__ = ["owned_folder_lock", "replace_owned_folder", "staging_folder"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# mkdtemp's names: the prefix, then 8 characters of its alphabet.
_STAGING = r"\.{name}\.(?:old\.)?[a-z0-9_]{{8}}"


def _foreign_entries(folder: Path, names: Collection[str], format_prefix: str) -> list[str]:
    """What in ``folder`` featurescope did not write; empty when the folder is wholly ours."""
    manifest = folder / "search.json"
    try:
        with open(manifest, encoding="utf-8") as fh:
            fmt = json.load(fh).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if not isinstance(fmt, str) or not fmt.startswith(format_prefix):
        return [f"{manifest.name} (not featurescope's: its format is {fmt!r})"]
    foreign = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name not in names or not entry.is_file(follow_symlinks=False):
            foreign.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
    return foreign


def check_replaceable(
    target: Path, names: Collection[str], format_prefix: str, *, overwrite: bool
) -> None:
    """Refuse ``target`` unless it is absent, or a folder featurescope wrote and may replace.

    Raises:
        FeaturescopeError: ``target`` is a file or a link, a folder with anything featurescope
            did not write (named in the message), or a saved search and ``overwrite`` is false.
    """
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_dir():
        raise FeaturescopeError(
            f"{target} exists and is not a folder featurescope wrote; featurescope never "
            "replaces it (overwrite=True does not change this): choose another path"
        )
    foreign = _foreign_entries(target, names, format_prefix)
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise FeaturescopeError(
            f"{target} holds what featurescope did not write ({shown}); a save replaces only "
            "a folder that is wholly featurescope's and never deletes other files "
            "(overwrite=True does not change this): choose another path, or move those out"
        )
    if not overwrite:
        raise FeaturescopeError(
            f"{target} already holds a saved search; pass overwrite=True to replace it"
        )


@contextlib.contextmanager
def owned_folder_lock(target: Path) -> Iterator[None]:
    """Hold the lock that serialises saves to ``target``.

    On POSIX systems it is an ``flock`` on the parent folder itself, so no lock file is left
    beside the user's files; elsewhere a ``filelock`` file ``.<name>.lock`` beside ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        from filelock import FileLock

        with FileLock(str(target.parent / f".{target.name}.lock")):
            yield
        return
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def remove_leftovers(target: Path, names: Collection[str]) -> None:
    """Remove the temporary folders of earlier, killed saves to ``target``.

    Called under :func:`owned_folder_lock`, so no live save owns them. Only folders named as
    :func:`staging_folder` names them and holding nothing but the format's files (complete or
    half-written) are removed.
    """
    pattern = re.compile(_STAGING.format(name=re.escape(target.name)))
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(target.parent):
            if not pattern.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            inside = os.listdir(entry.path)
            # The format's files, and atomic writes' temporaries of them (".index.safetensors.x.tmp").
            if all(n in names or any(n.startswith(f".{m}.") for m in names) for n in inside):
                shutil.rmtree(entry.path, ignore_errors=True)


def staging_folder(target: Path) -> Path:
    """A new private folder beside ``target`` to assemble its replacement in."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); ``False`` where that is not available."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE)
    )
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_owned_folder(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``, atomically where the file system allows it.

    With an exchange, ``target`` always holds the old folder or the new one. Without one (other
    systems), the old folder is renamed aside first and put back if the second rename fails.
    """
    if not os.path.lexists(target):
        os.replace(staging, target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the old folder
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
