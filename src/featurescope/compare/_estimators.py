"""The two estimators of linear CKA, as sums that grow batch by batch and add across ranks.

**Exact** (``"exact"``): the linear CKA of the whole dataset, Kornblith et al. (2019),

    CKA(X, Y) = ||X̃ᵀỸ||²_F / (||X̃ᵀX̃||_F ||ỸᵀỸ||_F),   X̃ = X centred by columns,

which is the textbook ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``K = XXᵀ``,
``HSIC = tr(KHLH) / (n-1)²`` rewritten in feature space: ``tr(KHLH) = ||X̃ᵀỸ||²_F``, so no
``n × n`` Gram matrix is ever built and memory is ``p_a² + p_b² + p_a p_b`` whatever ``n``. The
centred co-moments ``X̃ᵀỸ`` are merged batch by batch with the pairwise update of Chan, Golub
and LeVeque (1979) rather than accumulated raw as ``XᵀY - n μ_x μ_yᵀ``: raw sums lose every digit
the means share with the spread, and activations after ReLU have large means.

**Minibatch** (``"minibatch"``): Nguyen, Raghu and Kornblith (2021), the unbiased HSIC₁ of Song
et al. (2012) averaged over batches of ``m >= 4`` images,

    HSIC₁(K, L) = [tr(K̃L̃) + 1ᵀK̃1 1ᵀL̃1 / ((m-1)(m-2)) - 2/(m-2) 1ᵀK̃L̃1] / (m(m-3)),

with ``K̃`` the Gram matrix ``XXᵀ`` of the batch with its diagonal set to zero, and CKA =
``mean HSIC₁(K, L) / sqrt(mean HSIC₁(K, K) mean HSIC₁(L, L))``. Memory is ``m²`` per node. Its
expectation does not depend on the batch size, so unlike the exact estimator it has no positive
offset for independent features (which is about ``p / (n + p)`` for two independent Gaussian
representations of width ``p`` over ``n`` images); the price is that its value depends on which
images share a batch, which is why the batches are fixed once and shared by both models and
every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

__all__ = ["MIN_BATCH", "AllReduce", "ExactMoments", "MinibatchHSIC", "hsic1"]

#: HSIC₁ divides by ``m (m - 3)`` and ``(m - 1)(m - 2)``: it needs batches of at least 4.
MIN_BATCH = 4

Pair = tuple[int, int]
#: Sums a float64 tensor over every rank and returns the total (the identity on one process).
AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _gram_without_diagonal(x: torch.Tensor) -> torch.Tensor:
    k = x @ x.T
    k.diagonal().zero_()
    return k


def hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741 - the paper's name
    """Unbiased HSIC₁ of two ``m × m`` Gram matrices with zero diagonals (Song et al. 2012).

    Example:
        >>> x = torch.randn(8, 3, dtype=torch.float64)
        >>> k = (x @ x.T).fill_diagonal_(0)
        >>> bool(hsic1(k, k) > 0)
        True
    """
    m = k.shape[0]
    row_k, row_l = k.sum(1), l.sum(1)
    trace = (k * l).sum()
    both = row_k.sum() * row_l.sum() / ((m - 1) * (m - 2))
    cross = 2.0 * (row_k @ row_l) / (m - 2)
    return (trace + both - cross) / (m * (m - 3))


class ExactMoments:
    """Centred co-moments of node features over every image seen, merged a batch at a time.

    Args:
        pairs: the ``(i, j)`` cells to compute: node ``i`` of model A with node ``j`` of B.
        widths_a: each node of A's features per image.
        widths_b: each node of B's.
        device: where the sums live (float64).
    """

    def __init__(
        self,
        pairs: Iterable[Pair],
        widths_a: Sequence[int],
        widths_b: Sequence[int],
        device: torch.device,
    ) -> None:
        self.pairs = sorted(set(pairs))
        self.count = 0

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        self.mean_a = {i: zeros(widths_a[i]) for i in self.nodes_a}
        self.mean_b = {j: zeros(widths_b[j]) for j in self.nodes_b}
        self.gram_a = {i: zeros(widths_a[i], widths_a[i]) for i in self.nodes_a}
        self.gram_b = {j: zeros(widths_b[j], widths_b[j]) for j in self.nodes_b}
        self.cross = {(i, j): zeros(widths_a[i], widths_b[j]) for i, j in self.pairs}

    @property
    def nodes_a(self) -> list[int]:
        return sorted({i for i, _ in self.pairs})

    @property
    def nodes_b(self) -> list[int]:
        return sorted({j for _, j in self.pairs})

    def update(self, xs: Mapping[int, torch.Tensor], ys: Mapping[int, torch.Tensor]) -> None:
        """Add one batch: ``xs[i]`` is node ``i``'s ``[m, p]`` float64 features (same for B)."""
        if not self.pairs:
            return
        m = next(iter(xs.values())).shape[0]
        n = self.count
        # Weight of the outer product of the mean shift in Chan et al.'s merge of two sets.
        w = n * m / (n + m)
        centred_a, shift_a = self._centre(xs, self.nodes_a, self.mean_a)
        centred_b, shift_b = self._centre(ys, self.nodes_b, self.mean_b)
        for grams, centred, shift in (
            (self.gram_a, centred_a, shift_a),
            (self.gram_b, centred_b, shift_b),
        ):
            for i, xc in centred.items():
                grams[i].addmm_(xc.T, xc).addr_(shift[i], shift[i], alpha=w)
        for i, j in self.pairs:
            self.cross[(i, j)].addmm_(centred_a[i].T, centred_b[j]).addr_(
                shift_a[i], shift_b[j], alpha=w
            )
        for means, shift in ((self.mean_a, shift_a), (self.mean_b, shift_b)):
            for i, delta in shift.items():
                means[i].add_(delta, alpha=m / (n + m))
        self.count = n + m

    def _centre(
        self, xs: Mapping[int, torch.Tensor], nodes: list[int], means: dict[int, torch.Tensor]
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        centred, shift = {}, {}
        for i in nodes:
            batch_mean = xs[i].mean(0)
            centred[i] = xs[i] - batch_mean
            shift[i] = batch_mean - means[i]
        return centred, shift

    def combine(self, all_reduce: AllReduce) -> None:
        """Merge every rank's moments into the whole dataset's, in place, on every rank.

        Each rank's co-moments are about its own means; moved to the global mean they add up:
        ``C = Σ_r C_r + n_r (μ_r - μ)(ν_r - ν)ᵀ``.
        """
        if not self.pairs:
            return
        count = all_reduce(torch.tensor([float(self.count)], dtype=torch.float64))
        n_r, n = float(self.count), float(count.item())
        offsets: dict[str, dict[int, torch.Tensor]] = {}
        for side, means in (("a", self.mean_a), ("b", self.mean_b)):
            offsets[side] = {}
            for i, mean in means.items():
                total = all_reduce(mean * n_r) / n
                offsets[side][i] = mean - total
                means[i] = total
        for side, grams in (("a", self.gram_a), ("b", self.gram_b)):
            for i, gram in grams.items():
                d = offsets[side][i]
                grams[i] = all_reduce(gram.addr(d, d, alpha=n_r))
        for (i, j), cross in self.cross.items():
            self.cross[(i, j)] = all_reduce(cross.addr(offsets["a"][i], offsets["b"][j], alpha=n_r))
        self.count = round(n)

    def cka(self, i: int, j: int) -> float:
        """Linear CKA of cell ``(i, j)``; NaN where a node's features are constant."""
        numerator = float(torch.linalg.matrix_norm(self.cross[(i, j)]) ** 2)
        denominator = float(
            torch.linalg.matrix_norm(self.gram_a[i]) * torch.linalg.matrix_norm(self.gram_b[j])
        )
        return numerator / denominator if denominator > 0 else math.nan

    def state(self) -> dict[str, torch.Tensor]:
        """The sums as named tensors, to save (see :meth:`load`)."""
        out = {"count": torch.tensor([self.count], dtype=torch.int64)}
        for side, means, grams in (
            ("a", self.mean_a, self.gram_a),
            ("b", self.mean_b, self.gram_b),
        ):
            for i in means:
                out[f"mean_{side}.{i}"] = means[i]
                out[f"gram_{side}.{i}"] = grams[i]
        for (i, j), cross in self.cross.items():
            out[f"cross.{i}.{j}"] = cross
        return out

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take the sums back from :meth:`state`."""
        self.count = int(state["count"].item())
        for key, value in state.items():
            kind, _, rest = key.partition(".")
            if kind == "cross":
                i, j = rest.split(".")
                self.cross[(int(i), int(j))].copy_(value)
            elif kind != "count":
                getattr(self, kind)[int(rest)].copy_(value)


class MinibatchHSIC:
    """Sums of HSIC₁ over the batches seen, for each cell and each node with itself.

    Args:
        pairs: the ``(i, j)`` cells to compute.
        n_a: the number of nodes of model A.
        n_b: the number of nodes of model B.
        device: where the sums live (float64).
    """

    def __init__(self, pairs: Iterable[Pair], n_a: int, n_b: int, device: torch.device) -> None:
        self.pairs = sorted(set(pairs))
        self.batches = 0
        self.self_a = torch.zeros(n_a, dtype=torch.float64, device=device)
        self.self_b = torch.zeros(n_b, dtype=torch.float64, device=device)
        self.cross = torch.zeros(n_a, n_b, dtype=torch.float64, device=device)

    def update(self, xs: Mapping[int, torch.Tensor], ys: Mapping[int, torch.Tensor]) -> None:
        """Add one batch of at least :data:`MIN_BATCH` images."""
        if not self.pairs:
            return
        grams_a = {i: _gram_without_diagonal(xs[i]) for i in {i for i, _ in self.pairs}}
        grams_b = {j: _gram_without_diagonal(ys[j]) for j in {j for _, j in self.pairs}}
        for i, k in grams_a.items():
            self.self_a[i] += hsic1(k, k)
        for j, k in grams_b.items():
            self.self_b[j] += hsic1(k, k)
        for i, j in self.pairs:
            self.cross[i, j] += hsic1(grams_a[i], grams_b[j])
        self.batches += 1

    def combine(self, all_reduce: AllReduce) -> None:
        """Add every rank's sums, in place, on every rank."""
        if not self.pairs:
            return
        self.self_a = all_reduce(self.self_a)
        self.self_b = all_reduce(self.self_b)
        self.cross = all_reduce(self.cross)
        batches = all_reduce(torch.tensor([float(self.batches)], dtype=torch.float64))
        self.batches = round(float(batches.item()))

    def cka(self, i: int, j: int) -> float:
        """Minibatch CKA of cell ``(i, j)``; NaN where a node's HSIC₁ with itself is not > 0."""
        # The batch count cancels: mean / sqrt(mean · mean) = sum / sqrt(sum · sum).
        product = float(self.self_a[i] * self.self_b[j])
        return float(self.cross[i, j]) / math.sqrt(product) if product > 0 else math.nan

    def state(self) -> dict[str, torch.Tensor]:
        """The sums as named tensors, to save (see :meth:`load`)."""
        return {
            "batches": torch.tensor([self.batches], dtype=torch.int64),
            "self_a": self.self_a,
            "self_b": self.self_b,
            "cross": self.cross,
        }

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take the sums back from :meth:`state`."""
        self.batches = int(state["batches"].item())
        for name in ("self_a", "self_b", "cross"):
            getattr(self, name).copy_(state[name])
