"""The study's training loop, small enough to read in one sitting.

:func:`train` fits a classifier with cross-entropy, a step learning-rate schedule given as
``{epoch: lr}`` (the study's ``{1: 0.01, 19: 0.003}``) and SGD with momentum by default, and
returns a :class:`History` of per-epoch losses and accuracies. With a ``checkpoint_dir`` it keeps
the best and the last model as safe checkpoints (see :func:`featurescope.zoo.save_checkpoint`), and,
while the run is unfinished, a resume state after every epoch, so an interrupted run picks up
where it stopped and ends with the same weights as one that never stopped. A finished run leaves
only the two checkpoints and its history: the resume state (weights and optimizer, three times
the weights' size under Adam) is deleted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from featurescope._io import atomic_open, atomic_path
from featurescope._progress import Progress, progress
from featurescope.errors import CheckpointError, FeaturescopeError, UnknownNameError, did_you_mean
from featurescope.zoo.metadata import model_metadata, model_name

__all__ = [
    "BEST",
    "LAST",
    "OPTIMIZERS",
    "STUDY_LR_SCHEDULE",
    "History",
    "LRSchedule",
    "kaiming_init_",
    "lr_at",
    "train",
]

#: The study's schedule: lr 0.01 for epochs 1-18, 0.003 from epoch 19 on.
STUDY_LR_SCHEDULE: dict[int, float] = {1: 0.01, 19: 0.003}

#: ``{first epoch: lr}`` (epochs count from 1), or one lr for every epoch.
LRSchedule = Mapping[int, float] | float

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

#: The optimizers :func:`train` knows by name.
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")

BEST, LAST, STATE, HISTORY = "best.safetensors", "last.safetensors", "resume.pt", "history.json"
_STATE_FORMAT = "featurescope-train-state/1"
_SERIES = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


class EpochCallback(Protocol):
    """Called as ``on_epoch_end(epoch, history)`` after each epoch's checkpoints are saved."""

    def __call__(self, epoch: int, history: History) -> None: ...


def lr_at(schedule: LRSchedule, epoch: int) -> float:
    """The learning rate of ``epoch`` (counted from 1) under a step ``schedule``.

    Each key is the first epoch of its rate, which holds until the next key.

    Raises:
        FeaturescopeError: the schedule is empty, or does not start at epoch 1.

    Example:
        >>> [lr_at({1: 0.01, 19: 0.003}, e) for e in (1, 18, 19, 150)]
        [0.01, 0.01, 0.003, 0.003]
    """
    steps = _normalise_schedule(schedule)
    return next(lr for start, lr in reversed(steps) if start <= epoch)


def _normalise_schedule(schedule: LRSchedule) -> list[tuple[int, float]]:
    if isinstance(schedule, (int, float)):
        schedule = {1: float(schedule)}
    steps = sorted((int(k), float(v)) for k, v in schedule.items())
    if not steps or steps[0][0] != 1:
        raise FeaturescopeError(
            f"the lr schedule must give the rate of epoch 1 (epochs count from 1), got "
            f"{dict(steps)}; e.g. {{1: 0.01, 19: 0.003}}"
        )
    if any(lr <= 0 or not math.isfinite(lr) for _, lr in steps):
        raise FeaturescopeError(f"learning rates must be positive, got {dict(steps)}")
    return steps


@dataclass
class History:
    """Per-epoch results of :func:`train`, ready for JSON and for a curves plot.

    Each series has one entry per finished epoch (``val_*`` stay empty without validation
    data); ``info`` records the run's settings and checkpoint paths.

    Example:
        >>> h = History(train_loss=[1.2, 0.9], train_acc=[0.3, 0.5], val_loss=[1.1, 1.0],
        ...             val_acc=[0.4, 0.6], lr=[0.01, 0.01], seconds=[3.0, 2.9])
        >>> h.epochs, h.best_epoch, h.best_val_acc
        (2, 2, 0.6)
        >>> History.from_dict(h.to_dict()) == h
        True
    """

    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        """How many epochs have finished."""
        return len(self.train_loss)

    @property
    def best_epoch(self) -> int | None:
        """The epoch (from 1) with the highest validation accuracy, the earliest on ties."""
        if not self.val_acc:
            return None
        return int(np.argmax(self.val_acc)) + 1

    @property
    def best_val_acc(self) -> float | None:
        """The highest validation accuracy, or ``None`` without validation data."""
        return max(self.val_acc) if self.val_acc else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: one list per series (``train_loss``, ..., ``lr``) and ``info``."""
        d: dict[str, Any] = {name: list(getattr(self, name)) for name in _SERIES}
        d["info"] = dict(self.info)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> History:
        """Inverse of :meth:`to_dict`."""
        series = {name: [float(v) for v in d.get(name, [])] for name in _SERIES}
        return cls(**series, info=dict(d.get("info", {})))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON, atomically; returns the path."""
        with atomic_open(path) as fh:
            json.dump(self.to_dict(), fh, indent=1)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> History:
        """Read a history written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def kaiming_init_(model: nn.Module, *, last_std: float = 0.01) -> nn.Module:
    """Re-initialise every conv and linear layer with He (Kaiming) normal weights, in place.

    PyTorch's default init scales weights for a gain of 1/3, so through AlexNet's eight layers
    (without normalisation) activations and gradients shrink until Adam or SGD spends many
    epochs at chance. He init keeps their scale through ReLUs; the last layer starts small so
    the first predictions are near uniform. Biases start at zero.

    Args:
        model: any network; layers other than ``Conv2d`` and ``Linear`` are left alone.
        last_std: standard deviation of the last linear layer's weights.

    Returns:
        ``model``, for chaining.

    Example:
        >>> from torch import nn
        >>> net = kaiming_init_(nn.Sequential(nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 2)))
        >>> float(net[0].bias.detach().abs().sum()), bool(net[2].weight.detach().abs().max() < 0.1)
        (0.0, True)
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for layer in layers:
            nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        last = [m for m in layers if isinstance(m, nn.Linear)]
        if last:
            nn.init.normal_(last[-1].weight, std=last_std)
    return model


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it.
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def _make_optimizer(
    optimizer: str | OptimizerFactory,
    params: list[nn.Parameter],
    lr: float,
    momentum: float,
    weight_decay: float | None,
) -> torch.optim.Optimizer:
    if callable(optimizer):
        return optimizer(params)
    name = optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay or 0.0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay or 0.0)
    if name == "adamw":
        wd = 0.01 if weight_decay is None else weight_decay
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    raise UnknownNameError(
        f"unknown optimizer {optimizer!r}; choose from {list(OPTIMIZERS)} or pass a callable "
        f"params -> torch.optim.Optimizer.{did_you_mean(name, OPTIMIZERS)}"
    )


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _class_names(model: nn.Module, data: Dataset[Any]) -> list[str] | None:
    classes = getattr(data, "classes", None)
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return None
    meta = model_metadata(model)
    n = meta.num_classes if meta is not None else None
    return classes if n is None or n == len(classes) else None


def _to_device(
    images: torch.Tensor, device: torch.device, memory_format: torch.memory_format
) -> torch.Tensor:
    if images.dim() != 4:  # channels-last applies to image batches only
        return images.to(device, non_blocking=True)
    return images.to(device, memory_format=memory_format, non_blocking=True)


def _run_epoch(
    model: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    memory_format: torch.memory_format,
    bar: Progress,
    epoch: int,
) -> tuple[float, float]:
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    for step, (images, labels) in enumerate(loader, start=1):
        images = _to_device(images, device, memory_format)
        labels = torch.as_tensor(labels).to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        batch_loss = loss.item()
        if not math.isfinite(batch_loss):
            raise FeaturescopeError(
                f"the training loss became {batch_loss} at epoch {epoch}, step {step}; the "
                "learning rate is probably too high for this model (try 10x lower)"
            )
        n = labels.shape[0]
        total_loss += batch_loss * n
        correct += int((logits.argmax(1) == labels).sum())
        seen += n
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.2f}")
    return total_loss / max(seen, 1), correct / max(seen, 1)


@torch.inference_mode()
def _evaluate(
    model: nn.Module,
    loader: DataLoader[Any],
    device: torch.device,
    memory_format: torch.memory_format,
) -> tuple[float, float]:
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images = _to_device(images, device, memory_format)
        labels = torch.as_tensor(labels).to(device, non_blocking=True)
        logits = model(images)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        seen += labels.shape[0]
    return total_loss / max(seen, 1), correct / max(seen, 1)


def _save_state(
    path: Path,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    history: History,
    fingerprint: dict[str, Any],
) -> None:
    # Plain tensors, numbers and strings only, so it loads back with weights_only=True.
    state = {
        "format": _STATE_FORMAT,
        "epoch": epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "history": json.dumps(history.to_dict()),
        "fingerprint": json.dumps(fingerprint, sort_keys=True),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _check_settings(folder: Path, saved: Mapping[str, Any], fingerprint: dict[str, Any]) -> None:
    changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if changed:
        diffs = "; ".join(
            f"{k}: {saved.get(k)!r} there, {fingerprint.get(k)!r} now" for k in changed
        )
        raise CheckpointError(
            f"{folder} holds a run with other settings ({diffs}). Pass resume=False to "
            "start over there, or use another checkpoint_dir."
        )


def _restore(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    fingerprint: dict[str, Any],
    epochs: int,
) -> tuple[History, int] | None:
    """The run found in ``folder``, loaded into ``model``: its history and the next epoch.

    An unfinished run continues from its resume state. A finished one (its history kept, and
    its final weights: ``last.safetensors``, or ``best.safetensors`` of the last epoch) is not
    trained again, unless more epochs are asked for than it ran: without its optimizer's state
    it cannot continue exactly, so it starts over. ``None``: nothing to continue.
    """
    state_path = folder / STATE
    if state_path.is_file():
        state = _load_state(state_path, fingerprint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return History.from_dict(json.loads(state["history"])), int(state["epoch"]) + 1
    if not (folder / HISTORY).is_file():
        return None
    finished = History.load(folder / HISTORY)
    # JSON-round-tripped, as the history stored them.
    now = json.loads(json.dumps(fingerprint))
    _check_settings(folder, {k: finished.info.get(k) for k in now}, now)
    weights = _final_weights(folder, finished.epochs)
    if finished.epochs < epochs or weights is None:
        return None
    from featurescope.zoo.checkpoints import load_weights

    load_weights(model, weights)
    return finished, finished.epochs + 1


def _final_weights(folder: Path, epoch: int) -> Path | None:
    """The checkpoint in ``folder`` holding epoch ``epoch``'s weights, if one is kept."""
    from featurescope.zoo.checkpoints import read_checkpoint_metadata

    for path in (folder / LAST, folder / BEST):
        if path.is_file() and read_checkpoint_metadata(path).get("epoch") == epoch:
            return path
    return None


def _load_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read the resume state {path} ({type(exc).__name__}: {exc}); delete it or "
            "pass resume=False to start over"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise CheckpointError(f"{path} is not a featurescope training state")
    _check_settings(path.parent, json.loads(state["fingerprint"]), fingerprint)
    return state


@contextlib.contextmanager
def _progress_bar(total: int, desc: str, enabled: bool) -> Iterator[Progress]:
    # A bar on a terminal; in a log, one line per epoch (train marks each one).
    with progress(total, desc, unit="batch", enabled=enabled, per_tenth=False) as bar:
        yield bar


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise FeaturescopeError(f"{name} must be an int >= {low}, got {value!r}")


def train(
    model: nn.Module,
    train_data: Dataset[Any],
    val_data: Dataset[Any] | None = None,
    *,
    epochs: int,
    batch_size: int = 16,
    lr_schedule: LRSchedule = STUDY_LR_SCHEDULE,
    optimizer: str | OptimizerFactory = "sgd",
    momentum: float = 0.9,
    weight_decay: float | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    num_workers: int = 0,
    eval_batch_size: int | None = None,
    channels_last: bool = False,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    on_epoch_end: EpochCallback | None = None,
) -> History:
    """Train a classifier the study's way and return its per-epoch :class:`History`.

    Each epoch shuffles ``train_data``, minimises cross-entropy at the epoch's learning rate,
    then measures loss and accuracy on ``val_data``. All randomness of an epoch (shuffling,
    dropout, augmentation, in every worker) is seeded from ``(seed, epoch)``, so on a CPU the
    same call gives the same weights, and a resumed run the same as an uninterrupted one. The
    model's initial weights are the caller's: seed before building it.

    With ``checkpoint_dir``, every epoch writes (atomically) ``last.safetensors``,
    ``best.safetensors`` when validation accuracy improves, ``history.json``, and
    ``resume.pt``, the state to continue from (weights, optimizer, history; plain tensors that
    load with ``weights_only=True``). Calling ``train`` again with the same settings resumes
    after the last finished epoch. When the run finishes, ``resume.pt`` is deleted: a finished
    run keeps its two checkpoints and ``history.json``, and calling ``train`` again loads
    ``last.safetensors`` instead of training; asked for more epochs than it ran, it starts
    over (the optimizer's state, needed to continue exactly, is gone).

    Args:
        model: any classifier mapping a batch of images to logits; trained in place and left
            in eval mode.
        train_data: a dataset of ``(image tensor, label)``, e.g. an
            :class:`~featurescope.data.ImageFolder`.
        val_data: the same for validation, or ``None`` (an empty dataset is an error).
        epochs: the total number of epochs (counted from 1, including resumed ones).
        batch_size: images per training step (the study used 8 and 16).
        lr_schedule: ``{first epoch: lr}``; the study's ``{1: 0.01, 19: 0.003}`` by default. A
            float means one rate throughout.
        optimizer: ``"sgd"`` (with ``momentum``), ``"adam"``, ``"adamw"``, or a callable that
            builds an optimizer from the parameters (its lr is set by the schedule).
        momentum: SGD momentum.
        weight_decay: L2 penalty; default 0, or 0.01 for AdamW.
        device: where to train; default CUDA when available, else the CPU.
        seed: seeds every random choice of training.
        num_workers: DataLoader worker processes (0 loads in the main process).
        eval_batch_size: batch size for validation; default ``batch_size``.
        channels_last: store the model's weights and each batch channels-last (NHWC), which
            oneDNN convolutions on CPUs and tensor cores on GPUs run faster (about 1.3x for the
            full AlexNet on a 2-core CPU). Results differ from NCHW only by rounding.
        checkpoint_dir: where to keep checkpoints and the resume state; ``None`` keeps none.
        resume: continue a run found in ``checkpoint_dir`` (``False`` starts over).
        progress: show a tqdm progress bar.
        on_epoch_end: called as ``on_epoch_end(epoch, history)`` after each epoch is saved;
            raising from it stops training with nothing lost.

    Returns:
        The :class:`History`, including resumed epochs. ``history.info`` records the settings
        and, with ``checkpoint_dir``, the ``best_checkpoint`` and ``last_checkpoint`` paths.

    Raises:
        FeaturescopeError: bad arguments (including an empty ``train_data`` or ``val_data``),
            or the loss became NaN/inf.
        UnknownNameError: an unknown optimizer name.
        CheckpointError: ``checkpoint_dir`` holds a run with other settings, or an unreadable
            state.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import TensorDataset
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(32, 4); y = (x[:, 0] > 0).long()
        >>> net = nn.Linear(4, 2)
        >>> h = train(net, TensorDataset(x, y), TensorDataset(x, y), epochs=3, batch_size=8,
        ...           lr_schedule={1: 0.1}, progress=False)
        >>> h.epochs, len(h.val_acc), h.train_loss[-1] < h.train_loss[0]
        (3, 3, True)
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise FeaturescopeError(f"epochs must be a positive int, got {epochs!r}")
    _check_int("batch_size", batch_size, 1)
    _check_int("num_workers", num_workers, 0)
    _check_int("seed", seed, 0)
    if eval_batch_size is not None:
        _check_int("eval_batch_size", eval_batch_size, 1)
    for name, value in (("momentum", momentum), ("weight_decay", weight_decay)):
        if value is not None and not (isinstance(value, int | float) and 0 <= value < math.inf):
            raise FeaturescopeError(f"{name} must be a finite number >= 0, got {value!r}")
    if len(train_data) == 0:  # type: ignore[arg-type]
        raise FeaturescopeError("train_data is empty")
    # An empty validation set would report val_acc 0.0 every epoch, as if the model had failed.
    if val_data is not None and len(val_data) == 0:  # type: ignore[arg-type]
        raise FeaturescopeError(
            "val_data is empty; pass a dataset with at least one image, or val_data=None to "
            "train without validation"
        )
    schedule = _normalise_schedule(lr_schedule)
    dev = _resolve_device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, params, schedule[0][1], momentum, weight_decay)
    opt_name = optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "custom")

    fingerprint: dict[str, Any] = {
        "model": model_name(model),
        "optimizer": opt_name,
        "batch_size": batch_size,
        "lr_schedule": [[e, lr] for e, lr in schedule],
        "momentum": momentum,
        "weight_decay": weight_decay,
        "seed": seed,
        "train_size": len(train_data),  # type: ignore[arg-type]
    }
    history = History(
        info={
            **fingerprint,
            "device": str(dev),
            "val_size": len(val_data) if val_data is not None else 0,  # type: ignore[arg-type]
            "class_names": _class_names(model, train_data),
        }
    )
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start = 1
    if folder is not None:
        history.info["best_checkpoint"] = str(folder / BEST)
        history.info["last_checkpoint"] = str(folder / LAST)
        restored = _restore(folder, model, opt, fingerprint, epochs) if resume else None
        if restored is not None:
            history, start = restored
        else:
            (folder / STATE).unlink(missing_ok=True)

    eval_loader = (
        DataLoader(val_data, batch_size=eval_batch_size or batch_size, num_workers=num_workers)
        if val_data is not None
        else None
    )
    steps = math.ceil(len(train_data) / batch_size)  # type: ignore[arg-type]
    desc = model_name(model)
    with _progress_bar(max(epochs - start + 1, 0) * steps, desc, progress) as bar:
        for epoch in range(start, epochs + 1):
            began = time.perf_counter()
            epoch_seed = _epoch_seed(seed, epoch)
            _seed_everything(epoch_seed)
            loader = DataLoader(
                train_data,
                batch_size=batch_size,
                shuffle=True,
                num_workers=num_workers,
                worker_init_fn=_seed_worker,
                generator=torch.Generator().manual_seed(epoch_seed),
                pin_memory=dev.type == "cuda",
            )
            lr = lr_at(dict(schedule), epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            bar.set_description(f"{desc} epoch {epoch}/{epochs}")
            train_loss, train_acc = _run_epoch(model, loader, opt, dev, memory_format, bar, epoch)
            history.train_loss.append(train_loss)
            history.train_acc.append(train_acc)
            history.lr.append(lr)
            if eval_loader is not None:
                val_loss, val_acc = _evaluate(model, eval_loader, dev, memory_format)
                history.val_loss.append(val_loss)
                history.val_acc.append(val_acc)
                bar.set_postfix(
                    loss=f"{train_loss:.3f}", acc=f"{train_acc:.2f}", val_acc=f"{val_acc:.2f}"
                )
            bar.mark()
            history.seconds.append(time.perf_counter() - began)
            if folder is not None:
                _save_epoch(folder, epoch, model, opt, history, fingerprint, train_data)
            if on_epoch_end is not None:
                on_epoch_end(epoch, history)
    if folder is not None:
        # Finished: what resuming needed is dead weight now.
        (folder / STATE).unlink(missing_ok=True)
    model.eval()
    return history


def _save_epoch(
    folder: Path,
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    history: History,
    fingerprint: dict[str, Any],
    train_data: Dataset[Any],
) -> None:
    """Best, last, history, then the resume state: a crash between them loses no epoch."""
    from featurescope.zoo.checkpoints import save_checkpoint

    classes = _class_names(model, train_data)
    meta = {
        "epoch": epoch,
        "train_loss": history.train_loss[-1],
        "train_acc": history.train_acc[-1],
        "val_loss": history.val_loss[-1] if history.val_loss else None,
        "val_acc": history.val_acc[-1] if history.val_acc else None,
        "lr": history.lr[-1],
        "seed": fingerprint["seed"],
    }
    name = fingerprint["model"] if model_metadata(model) is not None else None
    if history.best_epoch == epoch or (history.best_epoch is None):
        save_checkpoint(model, folder / BEST, model_name=name, class_names=classes, **meta)
    save_checkpoint(model, folder / LAST, model_name=name, class_names=classes, **meta)
    history.save(folder / HISTORY)
    _save_state(folder / STATE, epoch, model, optimizer, history, fingerprint)
