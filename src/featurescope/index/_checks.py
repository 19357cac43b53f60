"""Validation of what users hand an :class:`~featurescope.EmbeddingIndex`: vectors, ids, labels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from featurescope.errors import EmbeddingIndexError, InputShapeError
from featurescope.index._search._gallery import MAX_NORM

__all__ = [
    "RESERVED_IDS",
    "as_exclusions",
    "as_ids",
    "as_labels",
    "as_mask",
    "as_metadata",
    "as_vectors",
    "as_vectors_and_norms",
    "check_id_range",
    "check_k",
]


def _as_tensor(data: Any, what: str) -> Tensor:
    if isinstance(data, Tensor):
        return data.detach()
    try:
        return torch.as_tensor(np.asarray(data))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise EmbeddingIndexError(
            f"{what} must be a torch tensor or a numpy array, got {type(data).__name__}"
        ) from exc


def as_vectors(data: Any, dim: int, what: str = "vectors") -> Tensor:
    """Return ``data`` as a ``[n, dim]`` float32 CPU tensor of finite, not too large rows.

    Raises:
        InputShapeError: if ``data`` is not 2-D or its rows are not ``dim`` long.
        EmbeddingIndexError: on NaN or infinity (naming the first bad row), on a norm too large
            for float32 arithmetic, or on a non-real dtype.
    """
    return as_vectors_and_norms(data, dim, what)[0]


def as_vectors_and_norms(data: Any, dim: int, what: str = "vectors") -> tuple[Tensor, Tensor]:
    """:func:`as_vectors`, and float64 upper bounds of the rows' norms its check measured.

    Raises:
        InputShapeError: if ``data`` is not 2-D or its rows are not ``dim`` long.
        EmbeddingIndexError: on NaN or infinity (naming the first bad row), on a norm too large
            for float32 arithmetic, or on a non-real dtype.
    """
    t = _as_tensor(data, what)
    if t.dim() != 2:
        hint = " (a single vector needs a leading batch dimension: v[None])" if t.dim() == 1 else ""
        raise InputShapeError(f"{what} must be 2-D [n, {dim}], got shape {tuple(t.shape)}{hint}")
    if t.shape[1] != dim:
        raise InputShapeError(
            f"{what} have dimension {t.shape[1]} but the index holds {dim}-d vectors"
        )
    if t.is_complex() or t.dtype == torch.bool:
        raise EmbeddingIndexError(f"{what} must be real numbers, got dtype {t.dtype}")
    source = t
    t = t.to(device="cpu", dtype=torch.float32).contiguous()
    # One float32 pass (a float64 one costs twenty times more): its norms, raised by their
    # rounding bound, are upper bounds of the exact ones, which the search's error bounds use.
    norms = _norm_upper_bounds(torch.linalg.vector_norm(t, dim=1), dim)
    finite = torch.isfinite(norms)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0, 0])
        bad = "NaN" if bool(torch.isnan(t[row]).any()) else "infinity"
        if bad == "NaN" or bool(torch.isinf(t[row]).any()):
            cause = (
                " (after conversion to float32)"
                if source.dtype == torch.float64 and bad != "NaN"
                else ""
            )
            raise EmbeddingIndexError(
                f"{what} row {row} contains {bad}{cause}; remove or repair it before adding"
            )
    # The few rows whose bound reaches the limit are measured exactly, in float64.
    near = (~finite | (norms >= MAX_NORM)).nonzero().flatten()
    if near.numel():
        exact = torch.linalg.vector_norm(t[near], dim=1, dtype=torch.float64)
        over = exact >= MAX_NORM
        if bool(over.any()):
            first = int(over.nonzero()[0, 0])
            raise EmbeddingIndexError(
                f"{what} row {int(near[first])} has norm {float(exact[first]):.3g}, above the "
                f"supported {MAX_NORM:.3g}; rescale the vectors"
            )
        norms[near] = exact
    return t, norms


def _norm_upper_bounds(norms32: Tensor, dim: int) -> Tensor:
    """Float64 bounds ``≥ ‖x‖`` from float32 norms: a float32 sum of ``dim`` squares errs by at
    most ``γ_{dim+1}`` relatively (Higham §3.1, any summation order), squares that underflow
    lose at most ``2⁻¹²⁶`` each, the square root one rounding."""
    n = dim + 2
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24) if n * 2.0**-24 < 0.5 else math.inf
    r = norms32.to(torch.float64) * (1 + 2.0**-23)
    bound: Tensor = torch.sqrt(r * r * (1 + 2 * gamma) + dim * 2.0**-126) * (1 + 1e-12)
    return bound


#: Ids the index reserves: ``-1`` pads results, the largest int64 pads sharded merges.
RESERVED_IDS = (-1, 2**63 - 1)


def check_id_range(ids: Tensor, what: str = "ids") -> None:
    """Refuse the reserved ids ``-1`` and ``2**63 - 1`` (int64 ``ids``)."""
    for reserved in RESERVED_IDS:
        hit = (ids == reserved).nonzero()
        if hit.numel():
            raise EmbeddingIndexError(
                f"{what} entry {int(hit[0, 0])} is {reserved}, which the index reserves (-1 pads "
                f"results, {RESERVED_IDS[1]} pads merges across ranks); use ids in "
                f"[-2**63, -2] or [0, 2**63 - 2]"
            )


def _unsigned_in_range(data: Any, what: str) -> Any:
    """Unsigned and arbitrary-precision integers as int64, refusing what would wrap."""
    if isinstance(data, Tensor) and data.dtype in (torch.uint16, torch.uint32, torch.uint64):
        data = data.detach().cpu().numpy()
    if not isinstance(data, Tensor):
        array = np.asarray(data)
        if array.dtype == object or array.dtype.kind == "u":
            try:
                values = [int(v) for v in array.reshape(-1).tolist()]
            except (TypeError, ValueError) as exc:
                raise EmbeddingIndexError(f"{what} must be integers ({exc})") from exc
            bad = [v for v in values if not -(2**63) <= v < 2**63]
            if bad:
                raise EmbeddingIndexError(
                    f"{what} must fit int64 ([-2**63, 2**63 - 1]); {bad[0]} does not (it would "
                    "wrap around)"
                )
            return np.asarray(values, dtype=np.int64).reshape(array.shape)
    return data


def as_ids(data: Any, n: int, what: str = "ids") -> Tensor:
    """Return ``data`` as ``n`` int64 ids on the CPU, rejecting duplicates within the call,
    values that do not fit int64 and the reserved ids (see :func:`check_id_range`)."""
    t = _as_tensor(_unsigned_in_range(data, what), what)
    if t.dim() != 1 or t.shape[0] != n:
        raise InputShapeError(f"{what} must be 1-D with {n} entries, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        if t.is_floating_point() and bool((t == t.round()).all()) and t.abs().max() < 2**53:
            t = t.to(torch.int64)
        else:
            raise EmbeddingIndexError(f"{what} must be integers, got dtype {t.dtype}")
    t = t.to(device="cpu", dtype=torch.int64)
    check_id_range(t, what)
    uniq, counts = torch.unique(t, return_counts=True)
    if bool((counts > 1).any()):
        dup = uniq[counts > 1][:5].tolist()
        raise EmbeddingIndexError(f"{what} contain duplicates: {dup}; every id must be unique")
    return t


def as_labels(data: Any, n: int) -> Tensor:
    """Return ``n`` non-negative int64 labels on the CPU."""
    t = _as_tensor(data, "labels")
    if t.dim() != 1 or t.shape[0] != n:
        raise InputShapeError(f"labels must be 1-D with {n} entries, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise EmbeddingIndexError(f"labels must be integers, got dtype {t.dtype}")
    t = t.to(device="cpu", dtype=torch.int64)
    if n and int(t.min()) < 0:
        row = int((t < 0).nonzero()[0, 0])
        raise EmbeddingIndexError(f"labels must be >= 0; entry {row} is {int(t[row])}")
    return t


def as_metadata(data: Sequence[str | None] | None, n: int) -> list[str | None]:
    """Return ``n`` metadata strings (``None`` where absent)."""
    if data is None:
        return [None] * n
    if isinstance(data, str | bytes) or not isinstance(data, Sequence | np.ndarray):
        raise EmbeddingIndexError(
            f"metadata must be a sequence of {n} strings, got {type(data).__name__}"
        )
    items: list[str | None] = list(data)
    if len(items) != n:
        raise InputShapeError(f"metadata has {len(items)} entries for {n} vectors")
    for i, item in enumerate(items):
        if item is not None and not isinstance(item, str):
            raise EmbeddingIndexError(
                f"metadata entry {i} is {type(item).__name__}, not a string; use str(path)"
            )
    return items


def check_k(k: Any, available: int) -> int:
    """Validate the number of neighbours asked for."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise EmbeddingIndexError(f"k must be an int, got {type(k).__name__}")
    value = int(k)
    if value < 1:
        raise EmbeddingIndexError(f"k must be at least 1, got {value}")
    if value > available:
        raise EmbeddingIndexError(
            f"k={value} is larger than the {available} vectors that can be returned; lower k"
        )
    return value


def as_exclusions(exclude_ids: Any, nq: int) -> Tensor | None:
    """Return per-query ids to leave out as an ``[nq, m]`` int64 CPU tensor (``None`` for none).

    The one rule for :meth:`~featurescope.EmbeddingIndex.search` and
    :func:`~featurescope.index.retrieval_metrics`: ``[nq]`` (one id per query) or ``[nq, m]``
    integers; ids that are not in the index exclude nothing.
    """
    if exclude_ids is None:
        return None
    t = _as_tensor(exclude_ids, "exclude_ids")
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] != nq:
        raise InputShapeError(
            f"exclude_ids must be [nq] or [nq, m] with nq={nq}, got shape {tuple(t.shape)}"
        )
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise EmbeddingIndexError(f"exclude_ids must be integers, got dtype {t.dtype}")
    return t.to(dtype=torch.int64, device="cpu")


def as_mask(where: Any, n: int) -> Tensor:
    """Return ``where`` as a ``[n]`` bool CPU mask over the gallery, in insertion order."""
    t = _as_tensor(where, "where")
    if t.dtype != torch.bool:
        raise EmbeddingIndexError(
            f"where must be a boolean mask over the index, got dtype {t.dtype}; build one "
            "with index.select(ids=..., labels=...) or compare, e.g. index.labels == 3"
        )
    if t.dim() != 1 or t.shape[0] != n:
        raise InputShapeError(
            f"where must be 1-D with one entry per indexed vector ({n}), got shape {tuple(t.shape)}"
        )
    return t.cpu()
