"""A gallery on a 2-D map: PCA (UMAP when umap-learn is installed), for the explorer page and the app.

PCA is computed from the ``dim x dim`` covariance, accumulated in float64 a block at a time, so
a gallery of 100,000 vectors costs no more memory than its vectors; each axis's sign is fixed
(its largest loading positive) so the map does not flip between runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from featurescope.errors import FeaturescopeError

__all__ = ["PROJECTIONS", "pca_2d", "project_2d"]

#: What ``project_2d`` accepts: ``"auto"`` (UMAP when umap-learn is installed, else PCA).
PROJECTIONS = ("auto", "pca", "umap")
_BLOCK = 8192


def pca_2d(vectors: torch.Tensor) -> torch.Tensor:
    """The first two principal components of ``vectors`` ``[n, dim]``, as ``[n, 2]`` float64.

    Each axis's sign is fixed (its largest loading positive), so the map does not flip.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [2.0, 1.0], [4.0, 2.0]])
        >>> pca_2d(x)[:, 0].tolist()  # every point on the first axis, centred
        [-2.23606797749979, 0.0, 2.23606797749979]
    """
    n, dim = vectors.shape
    mean = torch.zeros(dim, dtype=torch.float64)
    for block in vectors.split(_BLOCK):
        mean += block.double().sum(dim=0)
    mean /= max(n, 1)
    if n <= dim:
        # Fewer points than dimensions: the thin SVD of the points is cheaper than the
        # dim x dim covariance's eigendecomposition (a 2048-d gallery of 15 images).
        _, _, vh = torch.linalg.svd(vectors.double() - mean, full_matrices=False)
        axes = vh[:2].T
    else:
        cov = torch.zeros(dim, dim, dtype=torch.float64)
        for block in vectors.split(_BLOCK):
            centred = block.double() - mean
            cov += centred.T @ centred
        axes = torch.linalg.eigh(cov)[1][:, -2:].flip(1)
    if axes.shape[1] < 2:  # one point, or one dimension: the second axis is flat
        axes = torch.cat([axes, torch.zeros(dim, 2 - axes.shape[1], dtype=torch.float64)], 1)
    signs = torch.sign(axes.gather(0, axes.abs().argmax(dim=0, keepdim=True)))
    axes = axes * torch.where(signs == 0, torch.ones_like(signs), signs)
    return torch.cat([(block.double() - mean) @ axes for block in vectors.split(_BLOCK)])


def project_2d(vectors: torch.Tensor, method: str = "auto") -> tuple[str, torch.Tensor]:
    """``(method used, [n, 2] coordinates)``: UMAP where asked or (``"auto"``) installed, else
    PCA.

    Raises:
        FeaturescopeError: ``method`` is unknown, or ``"umap"`` without umap-learn.
    """
    if method not in PROJECTIONS:
        raise FeaturescopeError(
            f"projection must be one of {', '.join(PROJECTIONS)}, got {method!r}"
        )
    if method in ("auto", "umap") and len(vectors) > 15:
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            if method == "umap":
                raise FeaturescopeError(
                    "projection='umap' needs umap-learn: pip install 'featurescope[umap]'"
                ) from None
        else:
            reducer: Any = umap.UMAP(n_components=2, random_state=0)
            return "UMAP", torch.as_tensor(np.asarray(reducer.fit_transform(vectors.numpy())))
    return "PCA", pca_2d(vectors)
