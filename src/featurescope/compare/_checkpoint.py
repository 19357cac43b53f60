"""A comparison's running sums on disk, so that an interrupted comparison resumes.

A folder written by :func:`featurescope.compare` with ``out=`` holds (per rank, ``rank{r}/``,
under ``torch.distributed``)::

    compare.json        what is compared: models, weights fingerprints, nodes, options, the
                        image order (written once)
    sums.safetensors    every running sum, with the batches done and each cell's estimator in
                        its metadata: one file, renamed into place, so the count of batches
                        done and the sums always agree

Sums are written when writing costs at most a twentieth of the time spent since the last write
(and at the end), so saving never dominates a comparison of wide nodes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurescope._io import atomic_open, atomic_path
from featurescope.compare._cells import Cells
from featurescope.errors import FeaturescopeError

__all__ = ["Checkpoint"]

MANIFEST = "compare.json"
SUMS = "sums.safetensors"
FORMAT = "featurescope.compare"
VERSION = 1
_SAVE_COST_RATIO = 20.0


class Checkpoint:
    """One rank's saved sums in ``folder``; resumes what a previous run with ``header`` began.

    Args:
        folder: the folder (created if needed).
        header: what is compared; a folder holding another comparison is refused.
        order: the image order planned now; a resumed run keeps the first run's.
        overwrite: start afresh even if ``folder`` holds a comparison.

    Raises:
        FeaturescopeError: ``folder`` holds a different comparison and ``overwrite`` is false.
    """

    def __init__(
        self, folder: Path, header: Mapping[str, Any], order: np.ndarray, overwrite: bool
    ) -> None:
        self.folder = folder
        self.order = order
        self._since_save = time.perf_counter()
        self._save_cost = 0.0
        folder.mkdir(parents=True, exist_ok=True)
        manifest = self._read_manifest()
        fresh = {"format": FORMAT, "version": VERSION, **header, "order": order.tolist()}
        if manifest is not None and not overwrite:
            stored = {k: v for k, v in manifest.items() if k != "order"}
            wanted = json.loads(json.dumps({k: v for k, v in fresh.items() if k != "order"}))
            if stored != wanted or len(manifest["order"]) != len(order):
                changed = sorted(k for k in {*stored, *wanted} if stored.get(k) != wanted.get(k))
                raise FeaturescopeError(
                    f"{folder} holds another comparison (it differs in "
                    f"{', '.join(changed) or 'the number of images'}); choose another folder or "
                    "pass overwrite=True"
                )
            # The first run fixed the order (a shuffling DataLoader would draw another).
            self.order = np.asarray(manifest["order"], dtype=np.int64)
            return
        (folder / SUMS).unlink(missing_ok=True)
        with atomic_open(folder / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(fresh, fh)

    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.folder / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise FeaturescopeError(f"{path} is not a readable comparison manifest: {exc}") from exc
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise FeaturescopeError(
                f"{path} is not a featurescope comparison of version {VERSION}; choose another "
                "folder or pass overwrite=True"
            )
        return manifest

    def restore(self, device: torch.device) -> tuple[int, Cells | None]:
        """``(batches done, their sums)``; ``(0, None)`` when nothing was saved yet."""
        path = self.folder / SUMS
        if not path.is_file():
            return 0, None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                state = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
            spec = json.loads(meta["cells"])
            done = int(meta["batches_done"])
        except (OSError, KeyError, ValueError) as exc:
            raise FeaturescopeError(
                f"{path} is damaged ({exc}); compare again with overwrite=True"
            ) from exc
        cells = Cells.create(spec["widths_a"], spec["widths_b"], spec["estimators"], device)
        cells.load(state)
        return done, cells

    def save(self, done: int, cells: Cells) -> None:
        """Write the sums after ``done`` batches, atomically."""
        from safetensors.torch import save_file

        began = time.perf_counter()
        state = {k: v.detach().to("cpu").contiguous() for k, v in cells.state().items()}
        meta = {"batches_done": str(done), "cells": json.dumps(cells.spec())}
        with atomic_path(self.folder / SUMS) as tmp:
            save_file(state, str(tmp), metadata=meta)
        now = time.perf_counter()
        self._save_cost = now - began
        self._since_save = now

    def save_if_cheap(self, done: int, cells: Cells) -> None:
        """Save when it costs at most a twentieth of the time since the last save."""
        if time.perf_counter() - self._since_save >= _SAVE_COST_RATIO * self._save_cost:
            self.save(done, cells)
