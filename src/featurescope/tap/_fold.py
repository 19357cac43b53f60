"""A dataset folded into a summary that does not grow with it, resumable and split across ranks.

:func:`~featurescope.tap._extract.extract` keeps every row of every node; some analyses keep
only a summary of bounded size, such as each channel's ``k`` strongest activations. :func:`fold`
streams the same batches (the same order, fixed once, and under ``torch.distributed`` the same
``DistributedSampler`` split) into an :class:`Accumulator`, whose state it saves to a folder so
that a killed run resumes where it stopped, and merges the ranks' states exactly at the end.

A folder written with ``out=`` holds (per rank, ``rank{r}/``, under ``torch.distributed``) one
file, ``fold.safetensors``: the accumulator's tensors, the planned order of the samples
(``order``) and, in its metadata, ``format``, ``version``, ``header`` (JSON: the model, its
preprocessing, fingerprints of its weights and of the data, the nodes, the accumulator's
configuration, the rank and world size) and ``completed`` (how many samples of ``order`` the
state holds). The file is replaced atomically, so its count and its state always agree; it is
rewritten when that costs at most a twentieth of the time since the last write, and at the end.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from featurescope._io import atomic_path
from featurescope._torch_utils import training_mode, weights_fingerprint
from featurescope.errors import FeaturescopeError
from featurescope.tap._extract import (
    _describe_model,
    _dist,
    _paths,
    _plan,
    _split,
    _target_device,
    data_fingerprint,
)

if TYPE_CHECKING:
    from featurescope.tap._tap import FeatureTap

__all__ = ["STATE_FILE", "Accumulator", "fold"]

STATE_FILE = "fold.safetensors"
FORMAT = "featurescope.fold"
VERSION = 1
# A save may cost at most 1/ratio of the time spent folding since the last one.
_SAVE_COST_RATIO = 20.0


class Accumulator(Protocol):
    """What :func:`fold` folds a dataset into: a summary whose size does not grow with it."""

    def config(self) -> dict[str, Any]:
        """Plain data (JSON) that a resumed run must match, e.g. ``{"k": 9, "reduce": "max"}``."""
        ...

    def update(self, features: Mapping[str, torch.Tensor], ids: torch.Tensor) -> None:
        """Fold in one batch: the tap's outputs and the samples' dataset indices."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state as CPU tensors (empty before the first batch)."""
        ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take up a state :meth:`state_dict` gave."""
        ...

    def merge(self, states: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Fold in other ranks' states (some possibly empty), exactly."""
        ...


class _StateFile:
    """One rank's saved state in ``folder``; refuses a state made by another fold."""

    def __init__(self, folder: Path, header: Mapping[str, Any]) -> None:
        self.path = folder / STATE_FILE
        self.header = json.loads(json.dumps(header))  # as it comes back from the file
        self._since_save = time.perf_counter()
        self._save_cost = 0.0

    def restore(self, overwrite: bool) -> tuple[np.ndarray, int, dict[str, torch.Tensor]] | None:
        """``(order, completed, state)`` of a run to resume; ``None`` to start afresh."""
        if not self.path.is_file():
            return None
        if overwrite:
            self.path.unlink()
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
            if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
                raise ValueError(f"not a featurescope fold of version {VERSION}")
            stored = json.loads(meta["header"])
            completed = int(meta["completed"])
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise FeaturescopeError(
                f"{self.path} is not a readable saved state ({exc}); pass overwrite=True to "
                "start afresh, or choose another folder"
            ) from exc
        changed = sorted(k for k in {*stored, *self.header} if stored.get(k) != self.header.get(k))
        if changed:
            raise FeaturescopeError(
                f"{self.path.parent} holds a run over other {_what(changed)} (it differs in "
                f"{', '.join(changed)}): resuming would mix two runs. Pass overwrite=True "
                "(--overwrite, or leave out --resume) to start afresh, or choose another folder."
            )
        order = tensors.pop("order").numpy()
        state = {key[len("state/") :]: t for key, t in tensors.items() if key.startswith("state/")}
        return order, completed, state

    def save(self, order: np.ndarray, completed: int, state: Mapping[str, torch.Tensor]) -> None:
        """Write ``state`` after ``completed`` samples of ``order``, atomically."""
        from safetensors.torch import save_file

        began = time.perf_counter()
        tensors = {f"state/{key}": t.detach().cpu().contiguous() for key, t in state.items()}
        tensors["order"] = torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64))
        meta = {
            "format": FORMAT,
            "version": str(VERSION),
            "header": json.dumps(self.header),
            "completed": str(completed),
        }
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        now = time.perf_counter()
        self._save_cost, self._since_save = now - began, now

    def save_if_cheap(
        self, order: np.ndarray, completed: int, state: Mapping[str, torch.Tensor]
    ) -> None:
        if time.perf_counter() - self._since_save >= _SAVE_COST_RATIO * self._save_cost:
            self.save(order, completed, state)


def _what(changed: Sequence[str]) -> str:
    names = {"data": "data", "weights": "weights", "model": "model", "nodes": "nodes"}
    parts = [names[c] for c in changed if c in names] or ["settings"]
    return " and ".join(dict.fromkeys(parts))


def fold(
    tap: FeatureTap,
    data: Dataset[Any] | DataLoader[Any],
    accumulator: Accumulator,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    num_workers: int = 0,
    desc: str = "fold",
) -> Accumulator:
    """Stream ``data`` through ``tap`` (eval and inference mode) into ``accumulator``.

    The samples are planned as :func:`~featurescope.tap._extract.extract` plans them (a
    DataLoader's order drawn once; under ``torch.distributed`` each rank takes its
    ``DistributedSampler`` part of one order), and every batch reaches
    :meth:`Accumulator.update` with its dataset indices. With ``out``, the state is saved to
    ``out`` (``out/rank{r}`` under ``torch.distributed``) as it goes; the same call resumes an
    interrupted run from there, and a finished one is read back without another pass. Under
    ``torch.distributed`` the ranks' states are gathered and merged, so every rank returns the
    whole dataset's result.

    Args:
        tap: the tap; its model is run in eval mode (each submodule's mode restored after).
        data: a map-style dataset (items an image tensor or ``(image, label, ...)``), or a
            batched DataLoader over one.
        accumulator: what to fold into; updated in place and returned.
        batch_size: images per forward for a dataset.
        device: where to run; default the model's device (the model must already be there).
        out: a folder to save the state in, and to resume from.
        overwrite: with ``out``, start afresh even if the folder holds a saved state.
        progress: show a progress bar (on rank 0).
        num_workers: DataLoader workers for a dataset.
        desc: the progress bar's label.

    Returns:
        ``accumulator``, holding the whole dataset.

    Raises:
        FeaturescopeError: the model is not on ``device``, the data is not a map-style dataset,
            or ``out`` holds a state of another fold (other data, weights, model, nodes or
            settings of the accumulator) or an unreadable one.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from featurescope.tap import FeatureTap
        >>> class Brightest:  # the largest value each node gives over the dataset
        ...     def __init__(self): self.best = {}
        ...     def config(self): return {"kind": "brightest"}
        ...     def update(self, features, ids):
        ...         for node, t in features.items():
        ...             self.best[node] = max(self.best.get(node, t.max()), t.max()).clone()
        ...     def state_dict(self): return dict(self.best)
        ...     def load_state_dict(self, state): self.best = dict(state)
        ...     def merge(self, states):
        ...         for state in states:
        ...             self.best = {n: max(t, state.get(n, t)) for n, t in self.best.items()}
        >>> tap = FeatureTap(torch.nn.Sequential(torch.nn.ReLU()), ["0"])
        >>> images = TensorDataset(torch.arange(-8.0, 10.0).view(6, 3, 1, 1))
        >>> fold(tap, images, Brightest(), batch_size=4, progress=False).best
        {'0': tensor(9.)}
    """
    rank, world = _dist()
    plan = _plan(data, batch_size, num_workers, rank, world)
    target = _target_device(tap.model, device)
    order, completed, saved = plan.ids, 0, None
    if out is not None:
        model_name, preprocessing = _describe_model(tap.model)
        header = {
            "model": model_name,
            "preprocessing": preprocessing,
            "weights": weights_fingerprint(tap.model),
            "data": data_fingerprint(plan.dataset, plan.ids, _paths(plan.dataset, plan.ids)),
            "nodes": tap.nodes,
            "accumulator": accumulator.config(),
            "rank": rank,
            "world_size": world,
        }
        folder = Path(out) / f"rank{rank}" if world > 1 else Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        saved = _StateFile(folder, header)
        restored = saved.restore(overwrite)
        if restored is not None:
            # The first run fixed the order (a shuffling DataLoader would draw another).
            order, completed, state = restored
            accumulator.load_state_dict(state)
    if completed < len(order):
        _run(tap, plan, order, completed, target, accumulator, saved, progress and rank == 0, desc)
    if world > 1:
        states: list[Any] = [None] * world
        torch.distributed.all_gather_object(states, accumulator.state_dict())
        accumulator.merge([s for r, s in enumerate(states) if r != rank])
    return accumulator


def _run(
    tap: FeatureTap,
    plan: Any,
    order: np.ndarray,
    completed: int,
    device: torch.device,
    accumulator: Accumulator,
    saved: _StateFile | None,
    progress: bool,
    desc: str,
) -> None:
    from featurescope._progress import progress as progress_bar

    consistent = True  # whether the accumulator holds exactly the first `completed` samples
    try:
        with (
            training_mode(tap.model, False),
            torch.inference_mode(),
            progress_bar(len(order), desc, unit="img", initial=completed, enabled=progress) as bar,
        ):
            for ids, batch in plan.loader(order[completed:]):
                inputs, _ = _split(batch)
                if isinstance(inputs, torch.Tensor):
                    inputs = inputs.to(device, non_blocking=device.type == "cuda")
                features = tap(inputs)
                consistent = False
                accumulator.update(features, ids)
                completed += len(ids)
                consistent = True
                if saved is not None:
                    saved.save_if_cheap(order, completed, accumulator.state_dict())
                bar.update(len(ids))
    except BaseException:
        # Interrupted (Ctrl-C, a bad file) between batches: keep what is done for the resume.
        if saved is not None and consistent and completed > 0:
            saved.save(order, completed, accumulator.state_dict())
        raise
    if saved is not None:
        saved.save(order, completed, accumulator.state_dict())
