"""The command line as a user runs it, in its own process: expected failures are one line on
stderr and exit code 1, nothing hangs, and --debug adds the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEATURESCOPE_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "featurescope", *args],
        capture_output=True,
        text=True,
        timeout=120,  # a hang fails here instead of stalling the suite
        cwd=cwd,
        env=env,
        check=False,
    )


def test_a_named_pipe_as_the_query_image_is_one_line_not_a_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    done = _run("maps", "pipe.jpg", "--out", "maps", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "featurescope maps: error: image 'pipe.jpg' is not a regular file (a named pipe, socket "
        "or device?)"
    ]


def test_debug_shows_the_traceback_of_an_expected_failure(tmp_path: Path) -> None:
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint at all")
    done = _run(
        "--debug", "convert", "state.pt", "o.safetensors", "--model", "alexnet", cwd=tmp_path
    )
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        "featurescope convert: error: state.pt is not a checkpoint: it looks like text"
    )
    assert not (tmp_path / "o.safetensors").exists()
