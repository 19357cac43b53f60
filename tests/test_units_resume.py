"""top_activations resumed into a folder: after a SIGKILL, after a Ctrl-C, and never onto
another run's state; each time equal, ties included, to a brute-force sort."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _units_reference import Images, assert_equals_brute_force, tie_images, tie_model
from featurescope.errors import FeaturescopeError
from featurescope.tap import fold
from featurescope.units import top_activations

NODES = ["1", "3"]
TESTS = Path(__file__).parent
STATE = "fold.safetensors"


def _completed(folder: Path) -> int:
    """How many samples the saved state holds (0 when nothing is saved yet)."""
    from safetensors import safe_open

    if not (folder / STATE).is_file():
        return 0
    with safe_open(str(folder / STATE), framework="pt") as fh:
        return int((fh.metadata() or {})["completed"])


_KILLED_RUN = """
import sys
from _units_reference import Images, tie_images, tie_model
from featurescope.units import top_activations
data = Images(tie_images(1, {n}), delay=0.05)
top_activations(tie_model(0), data, {nodes!r}, k=3, batch_size=2, out=sys.argv[1])
raise SystemExit("the run was meant to be killed before it finished")
"""


@pytest.mark.slow  # a second Python process: its imports take seconds
def test_a_run_killed_with_sigkill_resumes_to_the_brute_force(tmp_path: Path) -> None:
    n, out = 24, tmp_path / "top"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    script = _KILLED_RUN.format(n=n, nodes=NODES)
    child = subprocess.Popen([sys.executable, "-c", script, str(out)], env=env)
    try:
        deadline = time.monotonic() + 120
        while _completed(out) < 4:  # a few batches saved: the run is under way
            assert child.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no state was saved within 120 s"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    done = _completed(out)
    assert 0 < done < n

    data = Images(tie_images(1, n))
    top = top_activations(tie_model(0), data, NODES, k=3, batch_size=2, out=out)
    assert_equals_brute_force(top, tie_model(0), tie_images(1, n), k=3)
    assert data.read[done - n :] == list(range(done, n))  # only the rest is read
    assert len(data.read) <= n - done + 1  # (and maybe one sample for the data's fingerprint)
    assert _completed(out) == n


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(2, 14),
    stop=st.integers(1, 13),
    batch=st.integers(1, 4),
    k=st.integers(1, 6),
    reduce=st.sampled_from(["max", "mean"]),
)
def test_an_interrupted_run_resumes_to_the_brute_force(
    n: int, stop: int, batch: int, k: int, reduce: str
) -> None:
    stop = min(stop, n - 1)
    images = tie_images(n, n)
    with tempfile.TemporaryDirectory() as folder:
        interrupted = Images(images, stop_at=stop)
        with pytest.raises(KeyboardInterrupt):
            top_activations(
                tie_model(n), interrupted, NODES, k, reduce=reduce, batch_size=batch, out=folder
            )  # type: ignore[arg-type]
        done = _completed(Path(folder))
        assert done == stop // batch * batch  # every whole batch before the stop is kept
        again = Images(images)
        top = top_activations(
            tie_model(n), again, NODES, k, reduce=reduce, batch_size=batch, out=folder
        )  # type: ignore[arg-type]
        assert again.read[done - n :] == list(range(done, n))  # only the rest is read
        assert len(again.read) <= n - done + 1  # (and maybe one sample for the fingerprint)
        assert_equals_brute_force(top, tie_model(n), images, k, reduce)


def test_a_finished_run_is_read_back_without_another_pass(tmp_path: Path) -> None:
    images = tie_images(2, 9)
    first = top_activations(tie_model(0), Images(images), NODES, k=4, out=tmp_path)
    data = Images(images)
    second = top_activations(tie_model(0), data, NODES, k=4, out=tmp_path)
    assert len(data.read) <= 1  # the data's fingerprint, no pass
    for node in NODES:
        assert torch.equal(first[node].image_ids, second[node].image_ids)
        assert torch.equal(first[node].positions, second[node].positions)
        assert torch.equal(first[node].values, second[node].values)
        assert first[node].values.dtype == second[node].values.dtype == torch.float32


def test_a_resume_onto_another_run_is_refused(tmp_path: Path) -> None:
    images = tie_images(3, 8)
    top_activations(tie_model(0), Images(images), NODES, k=4, out=tmp_path)
    other_weights = tie_model(1)
    other_data = Images(images.flip(0))
    cases = [
        (dict(k=5), r"differs in accumulator"),
        (dict(reduce="mean"), r"differs in accumulator"),
        (dict(nodes=["1"]), r"other nodes .*differs in nodes"),
        (dict(model=other_weights), r"other weights .*differs in weights"),
        (dict(data=other_data), r"other data .*differs in data"),
        (dict(data=Images(images[:7])), r"differs in data"),
    ]
    for change, message in cases:
        kwargs = {"model": tie_model(0), "data": Images(images), "nodes": NODES, "k": 4, **change}
        with pytest.raises(FeaturescopeError, match=message) as caught:
            top_activations(**kwargs, out=tmp_path)  # type: ignore[arg-type]
        assert "overwrite=True" in str(caught.value)
    fresh = top_activations(tie_model(1), other_data, NODES, k=5, out=tmp_path, overwrite=True)
    assert_equals_brute_force(fresh, tie_model(1), images.flip(0), k=5)


def test_a_damaged_state_is_refused(tmp_path: Path) -> None:
    (tmp_path / STATE).write_bytes(b"not a state")
    with pytest.raises(FeaturescopeError, match="not a readable saved state"):
        top_activations(tie_model(0), tie_images(0, 3), NODES, k=2, out=tmp_path)


class _Sum:
    """A minimal accumulator: the sum of every value of one node, and how many samples."""

    def config(self) -> dict[str, str]:
        return {"kind": "sum"}

    def __init__(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)
        self.seen = torch.zeros((), dtype=torch.int64)

    def update(self, features: dict[str, torch.Tensor], ids: torch.Tensor) -> None:
        self.total = self.total + features["3"].double().sum()
        self.seen = self.seen + len(ids)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"total": self.total, "seen": self.seen}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.total, self.seen = state["total"], state["seen"]

    def merge(self, states: list[dict[str, torch.Tensor]]) -> None:
        for state in states:
            self.load_state_dict({k: getattr(self, k) + state[k] for k in ("total", "seen")})


def test_fold_takes_any_accumulator_and_restores_the_modes(tmp_path: Path) -> None:
    from featurescope.tap import FeatureTap

    model = tie_model(0).train()
    images = tie_images(0, 5)
    result = fold(FeatureTap(model, ["3"]), Images(images), _Sum(), batch_size=2, out=tmp_path)
    assert isinstance(result, _Sum) and int(result.seen) == 5
    with torch.no_grad():
        expected = model.eval()(images).double().sum()
    torch.testing.assert_close(result.total, expected)
    model.train()
    fold(FeatureTap(model, ["3"]), Images(images), _Sum(), out=tmp_path)
    assert model.training and all(m.training for m in model.modules())
    header = json.loads(_metadata(tmp_path)["header"])
    assert header["accumulator"] == {"kind": "sum"} and header["nodes"] == {"3": "3"}


def _metadata(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(folder / STATE), framework="pt") as fh:
        return dict(fh.metadata() or {})
