"""Safe checkpoint files: safetensors with metadata, ``weights_only`` state dicts, no pickles.

File I/O only: building a model from a file is the factory's (:func:`~featurescope.create_model`,
:func:`~featurescope.zoo.load_checkpoint`). A checkpoint written by :func:`save_checkpoint` records the
architecture, so the factory rebuilds the model from the file alone. ``.pt``/``.pth`` state dicts are
read with ``torch.load(..., weights_only=True)``; a pickled whole model is refused, and
:func:`convert_checkpoint` (``featurescope convert --trust-pickle``) turns one into a safetensors
checkpoint once its source is trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featurescope._io import atomic_path
from featurescope._version import __version__
from featurescope.errors import CheckpointError, UnsafeCheckpointError
from featurescope.zoo.metadata import model_metadata

__all__ = [
    "infer_num_classes",
    "load_weights",
    "read_checkpoint_metadata",
    "read_pickled_state_dict",
    "read_state_dict",
    "save_checkpoint",
    "tensor_shapes",
    "weights_tag",
]

FORMAT = "featurescope-checkpoint/1"
PathLike = str | os.PathLike[str]


def _model_meta(model: nn.Module) -> dict[str, Any]:
    meta = model_metadata(model)
    if meta is None:
        return {}
    names = list(meta.class_names) if meta.class_names is not None else None
    return {"model": meta.architecture, "num_classes": meta.num_classes, "class_names": names}


def save_checkpoint(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    **metadata: Any,
) -> Path:
    """Write a model's weights and what rebuilds it to a ``.safetensors`` file, atomically.

    The file is written beside ``path`` and renamed over it only once complete, so a crash
    mid-save leaves any previous file intact.

    Args:
        model: a zoo model (its name and classes are read from its ModelMetadata), any
            ``nn.Module`` with ``model_name`` given, or a state dict.
        path: destination, conventionally ``*.safetensors``.
        model_name: the zoo name to rebuild it with; defaults to the model's own.
        num_classes: defaults to the model's own.
        class_names: label names, in class-index order.
        **metadata: any JSON-serialisable extras (epoch, accuracy, ...), returned by
            :func:`read_checkpoint_metadata`.

    Returns:
        The path written.

    Example:
        >>> import tempfile, featurescope as fs
        >>> model = fs.create_model("alexnet_half", num_classes=3)
        >>> path = fs.zoo.save_checkpoint(model, tempfile.mkdtemp() + "/half.safetensors", epoch=7)
        >>> fs.zoo.read_checkpoint_metadata(path)["epoch"]
        7
    """
    from safetensors.torch import save_file

    own = _model_meta(model) if isinstance(model, nn.Module) else {}
    model_name = model_name or own.get("model")
    num_classes = num_classes if num_classes is not None else own.get("num_classes")
    class_names = class_names if class_names is not None else own.get("class_names")
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise CheckpointError(
            f"{len(class_names)} class names given for a model with {num_classes} classes"
        )
    try:
        extras = json.dumps(metadata)
    except TypeError as exc:
        raise CheckpointError(f"checkpoint metadata must be JSON-serialisable: {exc}") from exc
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    header = {
        "format": FORMAT,
        "featurescope_version": __version__,
        "model": json.dumps(model_name),
        "num_classes": json.dumps(num_classes),
        "class_names": json.dumps(class_names),
        "metadata": extras,
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path)


def _kind(path: Path) -> str:
    """What a file holds, from its first bytes: ``"safetensors"``, ``"zip"`` (``torch.save``),
    ``"pickle"`` (``torch.save`` in the legacy format) or ``"other"`` (not a checkpoint)."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"  # the PROTO opcode (and its version) that starts a binary pickle
    return "other"


def _not_a_checkpoint(path: Path) -> CheckpointError:
    with open(path, "rb") as fh:
        head = fh.read(64)
    # A multi-byte character cut at the 64th byte is not a sign of binary data.
    text = head.decode("utf-8", errors="replace").rstrip("\ufffd")
    if not head:
        looks = "the file is empty"
    elif "\ufffd" not in text and all(c.isprintable() or c.isspace() for c in text):
        first = (text.strip().splitlines() or [""])[0]
        looks = f"it looks like text ({first[:40]!r})"
    else:
        looks = f"it starts with the bytes {head[:8]!r}"
    return CheckpointError(
        f"{path} is not a checkpoint: {looks}. Expected a .safetensors file or a state dict "
        "written by torch.save (.pt/.pth)"
    )


def _existing(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist or is not a file")
    return p


def read_checkpoint_metadata(path: PathLike) -> dict[str, Any]:
    """What a featurescope checkpoint records: ``model``, ``num_classes``, ``class_names``,
    ``featurescope_version`` and the extra metadata given to :func:`save_checkpoint`.

    A plain state dict (``.pt``/``.pth``, or a foreign safetensors file) records none of these,
    and gives ``{}``.

    Example:
        >>> import tempfile, featurescope as fs
        >>> model = fs.create_model("alexnet_half", num_classes=2)
        >>> path = fs.zoo.save_checkpoint(model, tempfile.mkdtemp() + "/m.safetensors",
        ...                               class_names=["cat", "dog"], val_acc=0.75)
        >>> meta = fs.zoo.read_checkpoint_metadata(path)
        >>> meta["model"], meta["num_classes"], meta["class_names"], meta["val_acc"]
        ('alexnet_half', 2, ['cat', 'dog'], 0.75)
    """
    p = _existing(path)
    if _kind(p) != "safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as fh:
            raw = fh.metadata() or {}
    except Exception as exc:
        raise _unreadable(p, exc) from exc
    if raw.get("format") != FORMAT:
        return {}
    return _checked_metadata(p, raw)


def _parsed(path: Path, field: str, text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(
            f"{path}: corrupt featurescope metadata field {field!r} ({why})"
        ) from exc


def _field_error(path: Path, field: str, expected: str, value: Any) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return CheckpointError(
        f"{path}: the checkpoint's metadata field {field!r} must be {expected}, got {shown}; "
        "the file is corrupt or was not written by featurescope.zoo.save_checkpoint"
    )


def _checked_metadata(path: Path, raw: Mapping[str, str]) -> dict[str, Any]:
    """The metadata of a featurescope header, every field checked for its type."""
    extras = _parsed(path, "metadata", raw.get("metadata", "{}"))
    if not isinstance(extras, dict):
        raise _field_error(path, "metadata", "a JSON object", extras)
    meta: dict[str, Any] = dict(extras)
    model = _parsed(path, "model", raw.get("model", "null"))
    if model is not None and not (isinstance(model, str) and model):
        raise _field_error(path, "model", "a model name", model)
    num_classes = _parsed(path, "num_classes", raw.get("num_classes", "null"))
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise _field_error(path, "num_classes", "a positive whole number", num_classes)
    names = _parsed(path, "class_names", raw.get("class_names", "null"))
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _field_error(path, "class_names", "a list of strings", names)
        if num_classes is not None and len(names) != num_classes:
            raise _field_error(
                path, "class_names", f"{num_classes} names (num_classes)", f"{len(names)} names"
            )
    meta.update(model=model, num_classes=num_classes, class_names=names)
    meta["featurescope_version"] = raw.get("featurescope_version")
    return meta


def tensor_shapes(path: PathLike) -> dict[str, tuple[int, ...]] | None:
    """The shape of every tensor of a ``.safetensors`` file, read from its header alone.

    The header's sizes are checked against the file's length when it is opened, so these
    shapes are bounded by the bytes actually present: what a checkpoint's metadata claims
    (``num_classes``) can be checked against them before a model is built. ``None`` for other
    kinds of files.

    Example:
        >>> import tempfile, featurescope as fs
        >>> path = fs.zoo.save_checkpoint(fs.create_model("alexnet_half", num_classes=3),
        ...                               tempfile.mkdtemp() + "/m.safetensors")
        >>> shapes = tensor_shapes(path)
        >>> min(shape[0] for shape in shapes.values() if len(shape) == 2)
        3
    """
    p = _existing(path)
    if _kind(p) != "safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
    except Exception as exc:
        raise _unreadable(p, exc) from exc


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable checkpoint (truncated or corrupt?): {type(exc).__name__}: {exc}"
    )


def _unsafe_message(path: Path) -> str:
    return (
        f"{path} holds pickled Python objects (e.g. a whole model saved with torch.save(model)), "
        "not just tensors. Loading it would run whatever code the file contains, so featurescope "
        "refuses. If you trust where it came from, convert it once to a safe checkpoint:\n"
        f"    featurescope convert {path} model.safetensors --model alexnet --trust-pickle\n"
        "and load the .safetensors file from then on. Save new models with "
        "featurescope.zoo.save_checkpoint (or torch.save(model.state_dict(), ...))."
    )


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{path} does not hold a state dict (a mapping of names to tensors); "
            f"found {type(obj).__name__}"
        )
    state = dict(obj)
    # nn.DataParallel and DistributedDataParallel prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint without unpickling anything.

    Raises:
        UnsafeCheckpointError: the file can only be read by unpickling arbitrary objects.
        CheckpointError: missing, truncated, corrupt or not a checkpoint.
    """
    p = _existing(path)
    kind = _kind(p)
    if kind == "other":
        raise _not_a_checkpoint(p)
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as exc:
            raise _unreadable(p, exc) from exc
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(_unsafe_message(p)) from exc
    except Exception as exc:
        raise _unreadable(p, exc) from exc
    return _unwrap_state_dict(obj, p)


def load_weights(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a checkpoint's weights into ``model`` in place (strictly) and return it.

    State dicts in the study's torchvision-style ``features.*``/``classifier.*`` layout load
    into the zoo AlexNets too.
    """
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        hint = ""
        if "size mismatch" in str(exc):
            hint = " If only the last layer differs, pass the checkpoint's num_classes."
        raise CheckpointError(
            f"the weights in {path} do not fit {type(model).__name__}: {exc}{hint}"
        ) from exc
    return model


def infer_num_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    """The output size of a state dict's last 2-D weight (its classifier), or ``None``."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(weights[-1].shape[0]) if weights else None


class _StubModule(nn.Module):
    """Stands in for a model class whose code is not importable, to recover its tensors."""


class _StubbingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (AttributeError, ImportError):
            return type(name, (_StubModule,), {"__module__": module})


class _StubbingPickleModule:
    """A ``pickle_module`` for :func:`torch.load` that tolerates missing model classes."""

    Unpickler = _StubbingUnpickler
    load = staticmethod(lambda fh, **kw: _StubbingUnpickler(fh, **kw).load())
    __name__ = "featurescope_stubbing_pickle"


def read_pickled_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Recover the tensors of a pickled checkpoint, even a whole model whose class is gone.

    This unpickles the file, which runs code it contains: only for files from a trusted
    source (``featurescope convert --trust-pickle``).
    """
    source = _existing(path)
    obj = torch.load(
        source, map_location="cpu", weights_only=False, pickle_module=_StubbingPickleModule
    )
    return _unwrap_state_dict(obj, source)


def weights_tag(path: PathLike) -> str:
    """``"checkpoint:<first 16 hex digits of the file's sha256>"``, for :class:`ModelMetadata`.

    Example:
        >>> import tempfile, featurescope as fs
        >>> path = fs.zoo.save_checkpoint(fs.create_model("alexnet_half"), tempfile.mkdtemp() + "/m.safetensors")
        >>> weights_tag(path).startswith("checkpoint:")
        True
    """
    digest = hashlib.sha256()
    with open(_existing(path), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"checkpoint:{digest.hexdigest()[:16]}"
