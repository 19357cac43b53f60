"""Fetch pretrained weights into the caches torchvision and timm use, or say why not.

Two places, each the one its library reads, so a file either library fetched is reused here and
a file fetched here is what that library then reads:

* torch's hub cache, ``torch.hub.get_dir()/checkpoints/<the URL's file name>`` (torchvision's
  weights, timm's URL-only weights), checked as ``torch.hub.load_state_dict_from_url(...,
  check_hash=True)`` checks it: the name's ``-<sha256 prefix>.`` (``torch.hub.HASH_REGEX``);
* Hugging Face's hub cache (timm's weights on the Hub), through
  ``huggingface_hub.hf_hub_download`` itself.

A cached file is used without a request. ``FEATURESCOPE_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``
forbids the network; a missing file or a failed transfer raises
:class:`~featurescope.errors.WeightsUnavailableError` naming the file, its URL and its folder, and
leaves nothing in the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import re
import sys
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from featurescope._progress import Progress
from featurescope._version import __version__
from featurescope.errors import WeightsUnavailableError

__all__ = ["OFFLINE_ENV", "fetch_hf", "fetch_url", "offline", "torch_hub_path"]

#: Set to ``1`` to forbid downloads (``HF_HUB_OFFLINE=1`` does too).
OFFLINE_ENV = "FEATURESCOPE_OFFLINE"
#: Seconds a connection or a read may wait before the download fails.
TIMEOUT = 30.0
_CHUNK = 1 << 20
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    """Whether downloads are forbidden (``FEATURESCOPE_OFFLINE`` or ``HF_HUB_OFFLINE`` is set).

    Example:
        >>> from unittest import mock
        >>> with mock.patch.dict("os.environ", {"FEATURESCOPE_OFFLINE": "1"}):
        ...     offline()
        True
    """
    return any(
        os.environ.get(v, "").strip().upper() in _TRUE for v in (OFFLINE_ENV, "HF_HUB_OFFLINE")
    )


def torch_hub_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url(url)`` caches ``url``'s file.

    Example:
        >>> torch_hub_path("https://download.pytorch.org/models/resnet18-f37072fd.pth").name
        'resnet18-f37072fd.pth'
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _unavailable(what: str, filename: str, url: str, folder: Path, why: str) -> str:
    why = " ".join(why.split())  # huggingface_hub's messages span lines; the CLI prints one
    return (
        f"the {what} ({filename}, from {url}) are not in {folder}: {why}. On a machine with "
        f"network access, 'featurescope weights fetch' puts them there; copy that folder to "
        "this machine's cache, then try again."
    )


def _offline_reason() -> str:
    return f"downloads are off ({OFFLINE_ENV} or HF_HUB_OFFLINE is set)"


def fetch_url(url: str, *, what: str, check_hash: bool) -> Path:
    """The file of ``url`` in torch's hub cache, downloaded there first if it is missing.

    Args:
        url: the weights' URL (torchvision's ``weights.url``, timm's ``pretrained_cfg.url``).
        what: what the file holds, for messages (``"IMAGENET1K_V1 weights of resnet18"``).
        check_hash: refuse a file whose SHA-256 does not start with the hex digits after the
            ``-`` of its name (``torch.hub.HASH_REGEX``), as torchvision asks ``torch.hub`` to.

    Raises:
        WeightsUnavailableError: the file is missing and downloads are off, or the download
            failed (the cause is chained); nothing is left in the cache.
    """
    cached = torch_hub_path(url)
    if cached.is_file():
        return cached
    if offline():
        raise WeightsUnavailableError(
            _unavailable(what, cached.name, url, cached.parent, _offline_reason())
        )
    match = torch.hub.HASH_REGEX.search(cached.name) if check_hash else None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        _download(url, cached, match.group(1) if match else None)
    except Exception as exc:
        raise WeightsUnavailableError(
            _unavailable(what, cached.name, url, cached.parent, f"downloading failed ({exc})")
        ) from exc
    return cached


def _download(url: str, dst: Path, hash_prefix: str | None) -> None:
    # torch.hub's temporary name: in the same folder (so the rename is atomic) and never the
    # name anything looks up.
    tmp = dst.with_name(f"{dst.name}.{uuid.uuid4().hex}.partial")
    request = urllib.request.Request(url, headers={"User-Agent": f"featurescope/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response, tmp.open("xb") as f:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None else None
            print(f"Downloading {url} to {dst}", file=sys.stderr, flush=True)
            digest = hashlib.sha256()
            with Progress(expected or 0, dst.name, unit="B") as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            received = f.tell()
        # http.client returns a short body without complaint when the peer closes early.
        if expected is not None and received != expected:
            raise OSError(f"the transfer stopped after {received} of {expected} bytes")
        if hash_prefix is not None and not digest.hexdigest().startswith(hash_prefix):
            raise OSError(
                f"invalid hash value (expected {hash_prefix!r}, got {digest.hexdigest()!r})"
            )
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


class _HubBar:
    """``huggingface_hub``'s ``tqdm_class``: its transfer drawn by featurescope's :class:`Progress`."""

    def __init__(
        self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any
    ) -> None:
        desc = str(kwargs.get("desc") or "download")
        self._bar = Progress(total or 0, desc, unit="B", initial=initial)

    def update(self, n: int | float | None = 1) -> None:
        self._bar.update(int(n or 0))

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> _HubBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hf_cached(repo_id: str, filename: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


def _hf_folder(repo_id: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def _hf_url(repo_id: str, filename: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_url

    return str(hf_hub_url(repo_id, filename, revision=revision))


def fetch_hf(
    repo_id: str,
    filenames: Sequence[str],
    *,
    revision: str | None = None,
    what: str,
) -> Path:
    """The first of ``filenames`` in a Hub repository, from Hugging Face's cache or downloaded.

    Every name is looked up in the cache first (no request); then they are downloaded in order
    with ``huggingface_hub.hf_hub_download``, a name the repository lacks passing to the next
    (timm prefers ``model.safetensors`` to ``pytorch_model.bin`` this way).

    Raises:
        WeightsUnavailableError: no name is cached and downloads are off, or no download
            succeeded (the cause is chained); nothing is left in the cache.
    """
    for filename in filenames:
        cached = _hf_cached(repo_id, filename, revision)
        if cached is not None:
            return cached
    folder, url = _hf_folder(repo_id), _hf_url(repo_id, filenames[0], revision)
    if offline():
        raise WeightsUnavailableError(
            _unavailable(what, " or ".join(filenames), url, folder, _offline_reason())
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    options: dict[str, Any] = {"revision": revision}
    if "tqdm_class" in inspect.signature(hf_hub_download).parameters:  # not in old versions
        options["tqdm_class"] = _HubBar
    for i, filename in enumerate(filenames):
        try:
            with _rollback_on_error(folder):
                print(
                    f"Downloading {_hf_url(repo_id, filename, revision)} to {folder}",
                    file=sys.stderr,
                    flush=True,
                )
                path = Path(hf_hub_download(repo_id, filename, **options))
                _check_blob(path)
                return path
        except EntryNotFoundError as exc:
            # The repository lacks this name: try the next, as timm does.
            if i + 1 < len(filenames) and not isinstance(exc, LocalEntryNotFoundError):
                continue
            error: Exception = exc
        except Exception as exc:
            error = exc
        why = f"downloading failed ({error})"
        raise WeightsUnavailableError(
            _unavailable(what, " or ".join(filenames[: i + 1]), url, folder, why)
        ) from error
    raise AssertionError("unreachable: filenames is empty")  # pragma: no cover


def _check_blob(path: Path) -> None:
    """Check a Hub file against its ETag, its blob's name, which huggingface_hub does not.

    The Hub names a large (LFS) file by its SHA-256 and a small one by its git blob SHA-1.
    """
    blob = path.resolve()
    if blob.parent.name != "blobs":  # a copy, where symlinks are not available: no name
        return
    etag = blob.name
    if re.fullmatch("[0-9a-f]{64}", etag):
        digest = hashlib.sha256()
    elif re.fullmatch("[0-9a-f]{40}", etag):
        digest = hashlib.sha1(b"blob %d\0" % blob.stat().st_size)  # git's blob hash
    else:
        return
    with blob.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != etag:
        raise OSError(f"invalid hash value (expected {etag!r}, got {digest.hexdigest()!r})")


def _watched(folder: Path) -> dict[Path, bytes | None]:
    """The paths a download into ``folder`` may create, with the content of its ``refs`` files."""
    root = folder.parent
    locks = root / ".locks" / folder.name
    paths = [root, root / "CACHEDIR.TAG", root / ".locks", folder, locks]
    for top in (folder, locks):
        if top.is_dir():
            paths.extend(top.rglob("*"))
    return {
        p: p.read_bytes() if p.is_file() and p.relative_to(root).parts[1:2] == ("refs",) else None
        for p in paths
        if p.exists() or p.is_symlink()
    }


@contextlib.contextmanager
def _rollback_on_error(folder: Path) -> Iterator[None]:
    """Undo what a failed ``hf_hub_download`` wrote into a repository's cache folder.

    huggingface_hub records the commit (``refs/main``), a lock, the absence of a file
    (``.no_exist``) and, in older versions, a resumable ``.incomplete`` blob before or during
    the transfer; after a failure none of them should outlive it.
    """
    before = _watched(folder)
    try:
        yield
    except BaseException:
        after = _watched(folder)
        for path in sorted(after, key=lambda p: len(p.parts), reverse=True):
            old = before.get(path)
            if path not in before:
                with contextlib.suppress(OSError):
                    path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
            elif old is not None and after[path] != old:
                path.write_bytes(old)
        raise
