"""How near a gallery row is to a query: the metrics, with their exact keys and proven bounds.

A metric tells the search three things. What a row and a query become before the fast pass
(centred rows for L2, the rows themselves for the inner product, unit rows for cosine; see
:meth:`Metric.rows`), an exact float64 *key* for the re-rank (ascending: the L2 distance, the
negated inner product, the negated cosine similarity), and the largest fast-pass score a row can
get when its key is at most a given value (:meth:`Metric.threshold`), which every row that might
be a neighbour stays below. The kernel (tiles, selection, re-rank, merge) is the same for all.

The fast pass scores a row ``s`` (as stored for the search) ``‖s + offset‖² − 2⟨p, s⟩`` for L2
and ``−2⟨p, s⟩`` for the others (``p`` the query as :meth:`Metric.prepare` makes it); its float32
rounding is bounded by :func:`error_coefficients` (Higham's ``γₙ``), or, for the bfloat16
product, by :func:`bf16_error`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from featurescope.index._search._backends import BF16_LOWER

if TYPE_CHECKING:
    from featurescope.index._search._gallery import Gallery

__all__ = [
    "METRICS",
    "Metric",
    "Queries",
    "bf16_error",
    "error_coefficients",
    "exact_distances",
    "metric_named",
    "unit",
]

_U32 = 2.0**-24
#: Unit roundoff of bfloat16 (8-bit significand, round to nearest).
_U16 = 2.0**-8
#: Smallest normal float32: the bfloat16 product may flush anything below it to zero.
_TINY = 2.0**-126
_U64 = 2.0**-53


def exact_distances(queries: Tensor, candidates: Tensor) -> Tensor:
    """Float64 Euclidean distances of each query to its own candidate rows.

    Args:
        queries: ``[r, d]`` float64.
        candidates: ``[r, m, d]`` or, with ``m`` squeezed, ``[r, d]``; float32 or float64.

    Every path uses this, and every square is exact (a difference of two float32 numbers and its
    square fit float64's 53 bits), so only the final ``sum`` rounds: equal pairs give bit-equal
    distances, the same as ``((q - x) ** 2).sum(-1).sqrt()`` in float64.
    """
    # ``.to`` returns the input itself when it is float64 already; the work below is in place
    # (a float32 − float64 subtraction that promotes is several times slower on the CPU).
    work = candidates.to(torch.float64, copy=True)
    work.sub_(queries[:, None, :] if work.dim() == 3 else queries)
    work.square_()
    return work.sum(-1).sqrt_()


def _product_rounding(device: torch.device) -> float:
    """Relative error a matrix product may add per term by rounding its float32 inputs."""
    precision = torch.get_float32_matmul_precision()
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        precision = "high" if precision == "highest" else precision
    if precision == "medium":  # bfloat16 inputs
        return 2.0**-7 + 2.0**-16
    if precision == "high":  # TensorFloat-32 (or better) inputs
        return 2.0**-10 + 2.0**-22
    return 0.0


def error_coefficients(dim: int, device: torch.device) -> tuple[float, float]:
    """Relative and absolute bound on one float32 score ``‖x̃‖² − 2⟨q', x̃⟩``.

    With ``n = d + 2`` roundings in any summation order, ``γₙ = nu/(1−nu)`` bounds the relative
    error of the sum of absolute terms (Higham, *Accuracy and Stability*, §3.1); underflow adds at
    most half a subnormal spacing per term. Doubled as a margin against BLAS paths we cannot see.
    """
    n = dim + 2
    if n * _U32 >= 0.25:
        raise ValueError(f"dim={dim} is too large for a float32 error bound")
    gamma = n * _U32 / (1 - n * _U32)
    rel = 2.0 * (gamma + _product_rounding(device) * (1 + gamma))
    return rel, 2.0 * n * 2.0**-149


@dataclass
class Queries:
    """One query tile in the forms the passes need."""

    centred: Tensor  # [b, d] float32 on the index device: fl(q − c)
    product: Tensor  # [b, d] ``centred`` in the dtype of the product (itself for float32)
    exact: Tensor  # [b, d] float64 on the vectors' device
    constant: Tensor  # [b] float64: ‖q'‖² − 2⟨q', offset⟩, on the index device
    slack: Tensor  # [b] float64: ε_q + ε_max
    error: Tensor  # [b] float64: bound on |score − exact score|


def bf16_error(product: Tensor, c64: Tensor, qnorm: Tensor, gal: Gallery) -> Tensor:
    """Bound on ``score − exact score`` when the product runs in bfloat16 (see ``_backends``).

    With ``a`` the float32 centred query, ``ã`` its bfloat16 copy (``δ = ‖ã − a‖``, measured),
    ``b = search[i] + offset``, ``b̃`` its bfloat16 copy (``ε = max ‖b̃ − b‖``, see
    :meth:`Gallery.low_precision_error`) and ``R`` the largest ``‖b‖``: products of bfloat16
    numbers are exact in float32, so the float32 accumulation errs by at most
    ``γ_d ‖ã‖‖b̃‖``; the inputs' rounding moves the product by at most ``δ(R + ε) + ‖a‖ε``. The output's rounding is already in
    each score (lowered by its own bound), and the float32 operations that form the score add
    a few roundings of its size. BLAS terms are doubled, as for the float32 product; subnormals
    the kernel may flush add an absolute term.
    """
    d = c64.shape[1]
    delta = torch.linalg.vector_norm(product.to(torch.float64) - c64, dim=1) * (1 + 1e-12)
    eps_b = gal.low_precision_error()
    a_norm = qnorm + delta
    b_norm = gal.centred_radius + eps_b
    gamma = d * _U32 / (1 - d * _U32)
    blas = 4.0 * gamma * a_norm * b_norm
    score_ops = 10.0 * _U32 * (gal.norm_max + 2.0 * (1 + BF16_LOWER) * a_norm * b_norm)
    inputs = 2.0 * (delta * b_norm + qnorm * eps_b) * (1 + 1e-9)
    flushed = 8.0 * (d + 2) * _TINY * (1 + a_norm) * (1 + b_norm)
    bound: Tensor = blas + score_ops + inputs + flushed
    return bound


class Metric:
    """What a search needs to know about its metric; one instance of each, chosen by name."""

    #: The name the index is built with and saved under.
    name: ClassVar[str]
    #: Whether results are similarities, reported largest first (the key negated).
    similarity: ClassVar[bool] = False
    #: Whether rows are searched relative to the gallery's mean (only L2 is translation-blind).
    centred: ClassVar[bool] = False
    #: Whether the fast pass adds each row's squared norm to its score.
    uses_norms: ClassVar[bool] = False
    #: Whether the stored float32 vectors can be searched as they are (no second copy).
    searches_vectors: ClassVar[bool] = True

    def rows(self, x64: Tensor, centre64: Tensor) -> Tensor:
        """The float64 rows the fast pass approximates, for float64 vectors ``x64``."""
        return x64

    def rows_pad(self, dim: int) -> float:
        """How far :meth:`rows` itself may be from the real rows (float64 rounding)."""
        return 0.0

    def report(self, key: Tensor) -> Tensor:
        """The value a result shows for exact keys ``key`` (``+inf`` padding included)."""
        return -key if self.similarity else key

    def key(self, reported: Tensor) -> Tensor:
        """The exact key back from a reported value (to merge results, e.g. across shards)."""
        return -reported if self.similarity else reported

    def exact(self, queries: Tensor, candidates: Tensor) -> Tensor:
        raise NotImplementedError

    def prepare(
        self, q32: Tensor, gal: Gallery, rel: float, absolute: float, low: bool = False
    ) -> Queries:
        raise NotImplementedError

    def threshold(self, upper: Tensor, qs: Queries) -> Tensor:
        raise NotImplementedError


class L2(Metric):
    """Euclidean distance; rows are centred on the gallery's mean, which keeps the bound narrow
    for data far from the origin."""

    name = "l2"
    centred = True
    uses_norms = True

    def rows(self, x64: Tensor, centre64: Tensor) -> Tensor:
        return x64 - centre64

    def exact(self, queries: Tensor, candidates: Tensor) -> Tensor:
        """Float64 Euclidean distances (see :func:`exact_distances`)."""
        return exact_distances(queries, candidates)

    def prepare(
        self, q32: Tensor, gal: Gallery, rel: float, absolute: float, low: bool = False
    ) -> Queries:
        """The tile's queries centred like the gallery, with their error bounds."""
        centred = q32 - gal.centre
        q64 = q32.to(torch.float64)
        c64 = centred.to(torch.float64)
        exact_rel = q64 - gal.centre.to(torch.float64)
        # Pad for the float64 subtraction itself, inexact only for far-apart exponents.
        eps_q = torch.linalg.vector_norm(c64 - exact_rel, dim=1) + 1e-15 * torch.linalg.vector_norm(
            exact_rel, dim=1
        )
        qnorm = torch.linalg.vector_norm(c64, dim=1)
        if low:
            product = centred.to(torch.bfloat16)
            error = bf16_error(product, c64, qnorm, gal)
            constant = (c64 * c64).sum(1)  # the bfloat16 rows are centred already: no offset
        else:
            product = centred
            error = rel * (gal.norm_max + 2.0 * qnorm * gal.radius_max) + absolute
            constant = (c64 * c64).sum(1) - 2.0 * (c64 @ gal.offset)
        return Queries(
            centred=centred,
            product=product,
            exact=q64.to(gal.vectors.device),
            constant=constant,
            slack=eps_q * (1 + 1e-12) + gal.eps_max,
            error=error,
        )

    def threshold(self, upper: Tensor, qs: Queries) -> Tensor:
        """Largest float32 score a vector within float64 distance ``upper`` of the query can get."""
        # A float64 distance over d terms is within (d + 2) float64 roundings of the real one.
        d = qs.centred.shape[1]
        reach = upper * (1 + 4 * (d + 2) * 2.0**-53) + qs.slack
        theta = reach * reach - qs.constant + qs.error
        return theta + 1e-12 * (reach * reach + qs.constant.abs() + qs.error)


class InnerProduct(Metric):
    """Inner product ``⟨q, x⟩``, largest first; the key is ``−⟨q, x⟩`` (exact products, one
    rounded sum)."""

    name = "ip"
    similarity = True

    def exact(self, queries: Tensor, candidates: Tensor) -> Tensor:
        """Float64 ``−⟨q, x⟩`` of each query with its own candidate rows (as
        :func:`exact_distances`: ``[r, m, d]`` or ``[r, d]`` candidates)."""
        return -_dots(queries, candidates)

    def prepare(
        self, q32: Tensor, gal: Gallery, rel: float, absolute: float, low: bool = False
    ) -> Queries:
        q64 = q32.to(torch.float64)
        qnorm = torch.linalg.vector_norm(q64, dim=1)
        d = q32.shape[1]
        # The float64 key errs by at most γ_d ‖q‖‖x‖; a stored row by ε from the vector moves
        # ⟨q, x⟩ by ‖q‖ε. Both enter the threshold twice (scores are −2⟨q, s⟩).
        reach = gal.radius_max + gal.eps_max
        key_error = 2.0 * (d + 2) * _U64 * qnorm * reach
        slack = 2.0 * (key_error + qnorm * gal.eps_max) * (1 + 1e-9)
        return _similarity_queries(q32, q64, qnorm, slack, rel, absolute, gal)

    def threshold(self, upper: Tensor, qs: Queries) -> Tensor:
        return _similarity_threshold(upper, qs)


class Cosine(Metric):
    """Cosine similarity ``⟨q, x⟩ / (‖q‖‖x‖)``, largest first, computed from the stored vectors
    in float64; a zero vector (query or row) has similarity 0 with everything. The fast pass
    reads unit rows (a float32 copy rounded from float64, or each tile normalised on the fly
    for galleries left on disk)."""

    name = "cosine"
    similarity = True
    searches_vectors = False

    def rows(self, x64: Tensor, centre64: Tensor) -> Tensor:
        return unit(x64)

    def rows_pad(self, dim: int) -> float:
        # A float64 norm, square root and division: a few float64 roundings per coordinate.
        return 2.0 * (dim + 8) * _U64

    def exact(self, queries: Tensor, candidates: Tensor) -> Tensor:
        """Float64 ``−cos(q, x)`` of each query with its own candidate rows."""
        dots = _dots(queries, candidates)
        work = candidates.to(torch.float64, copy=True)
        xn = work.square_().sum(-1).sqrt_()
        qn = queries.square().sum(-1).sqrt()
        scale = xn * (qn[:, None] if candidates.dim() == 3 else qn)
        cos = torch.where(scale > 0, dots / scale.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
        return -cos

    def prepare(
        self, q32: Tensor, gal: Gallery, rel: float, absolute: float, low: bool = False
    ) -> Queries:
        q64 = q32.to(torch.float64)
        u64 = unit(q64)
        p32 = u64.to(torch.float32)
        d = q32.shape[1]
        eps_q = torch.linalg.vector_norm(p32.to(torch.float64) - u64, dim=1) + self.rows_pad(d)
        # −2⟨p, s⟩ is within 2(ε_q(1 + ε) + ε) of −2 cos (‖s‖ ≤ 1 + ε, ‖q̂‖ ≤ 1); the float64
        # key errs by a few roundings of numbers at most 1.
        key_error = 4.0 * (d + 8) * _U64
        slack = 2.0 * (key_error + eps_q * (1 + gal.eps_max) + gal.eps_max) * (1 + 1e-9)
        pnorm = torch.linalg.vector_norm(p32.to(torch.float64), dim=1)
        return _similarity_queries(p32, q64, pnorm, slack, rel, absolute, gal)

    def threshold(self, upper: Tensor, qs: Queries) -> Tensor:
        return _similarity_threshold(upper, qs)


def unit(x64: Tensor) -> Tensor:
    """Rows divided by their float64 norm; zero rows stay zero."""
    norm = torch.linalg.vector_norm(x64, dim=-1, keepdim=True)
    return torch.where(norm > 0, x64 / norm.clamp(min=torch.finfo(torch.float64).tiny), 0.0)


def _dots(queries: Tensor, candidates: Tensor) -> Tensor:
    """Float64 ``⟨q, x⟩``: every product of two float32 numbers is exact, only the sum rounds."""
    work = candidates.to(torch.float64, copy=True)
    work.mul_(queries[:, None, :] if work.dim() == 3 else queries)
    return work.sum(-1)


def _similarity_queries(
    product: Tensor,
    q64: Tensor,
    pnorm: Tensor,
    slack: Tensor,
    rel: float,
    absolute: float,
    gal: Gallery,
) -> Queries:
    """Queries scored ``−2⟨p, s⟩`` (no norms): the float32 bound of that product."""
    error = rel * (2.0 * pnorm * gal.radius_max) + absolute
    return Queries(
        centred=product,
        product=product,
        exact=q64.to(gal.vectors.device),
        constant=torch.zeros_like(pnorm),
        slack=slack,
        error=error,
    )


def _similarity_threshold(upper: Tensor, qs: Queries) -> Tensor:
    """Largest fast-pass score ``−2⟨p, s⟩`` of a row whose float64 key is at most ``upper``."""
    theta = 2.0 * upper + qs.slack + qs.error
    return theta + 1e-12 * (theta.abs() + qs.slack + qs.error)


#: The metrics by name.
METRICS: dict[str, Metric] = {m.name: m for m in (L2(), InnerProduct(), Cosine())}


def metric_named(name: str) -> Metric:
    """The metric called ``name`` (``"l2"``, ``"cosine"`` or ``"ip"``).

    Raises:
        ValueError: for another name.
    """
    try:
        return METRICS[name]
    except (KeyError, TypeError):
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {name!r}") from None
