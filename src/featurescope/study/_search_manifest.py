"""The fields of a saved ImageSearch's ``search.json``, checked before any is used.

A manifest that parses but holds the wrong types, misses a key or asks for absurd sizes (a
``crop`` of 60,000 pixels would allocate 43 GB per query) is an
:class:`~featurescope.errors.IndexFileError` naming the field, never a raw ``KeyError`` or
``TypeError`` from deep inside loading.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from featurescope.errors import IndexFileError

__all__ = ["MAX_SIDE", "check_manifest"]

#: The largest ``resize`` and ``crop`` a manifest may ask for (a 4096² crop is 200 MB a query).
MAX_SIDE = 4096


def _is_int(value: Any, low: int, high: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_file_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and Path(value).name == value


def _str_list(value: Any, nullable: bool) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, str) or (nullable and v is None) for v in value
    )


def _finite_numbers(value: Any, positive: bool) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and all(
            isinstance(v, int | float)
            and not isinstance(v, bool)
            and math.isfinite(v)
            and (v > 0 or not positive)
            for v in value
        )
    )


#: field: (required, check, what it must be)
_FIELDS: dict[str, tuple[bool, Any, str]] = {
    "index": (True, _is_file_name, "the name of a file in the folder"),
    "checkpoint": (True, lambda v: v is None or _is_file_name(v), "a file name or null"),
    "model": (True, _is_str, "a model name"),
    "node": (True, _is_str, "a node name"),
    "preprocessing": (True, lambda v: isinstance(v, dict), "an object"),
    "paths": (True, lambda v: _str_list(v, nullable=True), "a list of strings or nulls"),
    "num_classes": (False, lambda v: v is None or _is_int(v, 1, 2**24), "null or 1..2**24"),
    "weights": (False, lambda v: v is None or _is_str(v), "a string or null"),
    "root": (False, lambda v: v is None or _is_str(v), "a folder path or null"),
    "class_names": (False, lambda v: v is None or _str_list(v, False), "a list of strings"),
    "skipped": (
        False,
        lambda v: (
            isinstance(v, list)
            and all(isinstance(p, list) and len(p) == 2 and _str_list(p, False) for p in v)
        ),
        "a list of [path, reason] pairs",
    ),
}

_PREPROCESSING: dict[str, tuple[bool, Any, str]] = {
    "resize": (True, lambda v: _is_int(v, 1, MAX_SIDE), f"an integer in 1..{MAX_SIDE}"),
    "crop": (True, lambda v: _is_int(v, 1, MAX_SIDE), f"an integer in 1..{MAX_SIDE}"),
    "mean": (True, lambda v: _finite_numbers(v, positive=False), "3 finite numbers"),
    "std": (True, lambda v: _finite_numbers(v, positive=True), "3 positive finite numbers"),
    "interpolation": (False, _is_str, "a string"),
}


def _check(path: Path, data: dict[str, Any], fields: dict[str, Any], prefix: str) -> None:
    for name, (required, ok, what) in fields.items():
        if name not in data:
            if required:
                raise IndexFileError(f"{path}: field '{prefix}{name}' is missing")
            continue
        if not ok(data[name]):
            shown = repr(data[name])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise IndexFileError(f"{path}: field '{prefix}{name}' must be {what}, got {shown}")


def check_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Return ``manifest`` once every field it uses has the right type and a sane size.

    Raises:
        IndexFileError: naming the first field that is missing or wrong.

    Example:
        >>> from pathlib import Path
        >>> check_manifest(Path("search.json"), {"index": "../escape"})
        Traceback (most recent call last):
        ...
        featurescope.errors.IndexFileError: search.json: field 'index' must be the name of a file in the folder, got '../escape'
    """
    _check(path, manifest, _FIELDS, "")
    _check(path, manifest["preprocessing"], _PREPROCESSING, "preprocessing.")
    return manifest
