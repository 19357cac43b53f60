"""A full disk during extraction to disk: an ``OSError`` naming the file, never a SIGBUS, and a
manifest that counts only rows on disk, so the run resumes to the exact features.

Three ways to fill a disk: a small tmpfs (as root, where mounting is allowed; skipped with the
reason otherwise), the process's file size limit (``RLIMIT_FSIZE``, any Linux), and an ``ENOSPC``
injected into the row writes (the path taken on file systems without ``posix_fallocate``).
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from featurescope.tap import FeatureTap, load_features
from featurescope.tap import _store as tap_store

WIDE = 4096  # float32 features per sample: 16 KiB


def _tap() -> FeatureTap:
    torch.manual_seed(0)
    return FeatureTap(nn.Sequential(nn.Linear(4, WIDE)).eval(), {"0": "wide"})


def _data(n: int) -> TensorDataset:
    return TensorDataset(torch.randn(n, 4, generator=torch.Generator().manual_seed(1)))


def _expected(n: int) -> np.ndarray:
    with torch.no_grad():
        return _tap()(_data(n).tensors[0])["wide"].numpy()


def _fill(fd: int) -> None:
    while True:
        os.write(fd, bytes(4096))


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE test covers the rest")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        # Lazily: arrays the test still holds map files there.
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_extraction_larger_than_a_small_tmpfs_is_an_oserror_naming_the_file(small_tmpfs):
    out = small_tmpfs / "features"
    with pytest.raises(OSError, match="No space left") as caught:
        _tap().extract(_data(200), out=out, batch_size=16, progress=False)  # 3.2 MB
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(out / "wide.npy")


@pytest.mark.slow
def test_full_disk_leaves_no_manifest_claiming_rows_and_the_run_resumes(small_tmpfs):
    out = small_tmpfs / "features"
    tap = _tap()
    tap.extract(_data(8), out=out, batch_size=8, progress=False)
    fd = os.open(small_tmpfs / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="No space left"):
            _fill(fd)
    finally:
        os.close(fd)
    more = small_tmpfs / "more"
    with pytest.raises(OSError, match="No space left") as caught:
        tap.extract(_data(40), out=more, batch_size=8, progress=False)
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename is not None and str(more) in str(caught.value.filename)
    np.testing.assert_array_equal(load_features(out)["wide"], _expected(8))  # nothing lost
    if (more / "manifest.json").exists():
        assert len(load_features(more)["wide"]) == 0
    (small_tmpfs / "filler").unlink()
    result = tap.extract(_data(40), out=more, batch_size=8, progress=False)
    np.testing.assert_array_equal(result["wide"], _expected(40))


def test_file_size_limit_is_an_oserror_naming_the_file(tmp_path):
    out = tmp_path / "features"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        with pytest.raises(OSError, match="too large") as caught:
            _tap().extract(_data(64), out=out, batch_size=16, progress=False)  # 1 MiB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert caught.value.errno == errno.EFBIG
    assert caught.value.filename == str(out / "wide.npy")


def test_failed_row_write_names_the_file_and_resumes_exactly(tmp_path, monkeypatch):
    out = tmp_path / "features"
    monkeypatch.setattr(tap_store, "_COMMIT_COST_RATIO", 0.0)  # commit every batch
    real_pwrite = os.pwrite
    calls = [0]

    def pwrite_fills_up(fd: int, data: bytes, offset: int) -> int:
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(tap_store.os, "pwrite", pwrite_fills_up)
    with pytest.raises(OSError, match="No space left") as caught:
        _tap().extract(_data(40), out=out, batch_size=8, progress=False)
    assert caught.value.filename == str(out / "wide.npy")
    # Two batches were written and committed; the failed one is not counted.
    assert len(load_features(out)["wide"]) == 16
    monkeypatch.setattr(tap_store.os, "pwrite", real_pwrite)
    result = _tap().extract(_data(40), out=out, batch_size=8, progress=False)
    np.testing.assert_array_equal(result["wide"], _expected(40))
