"""The patch of an input image that one activation reads, as the model saw it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["patch"]


def patch(
    image: torch.Tensor,
    box: tuple[int, int, int, int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Crop ``box`` out of a preprocessed image and undo its normalisation.

    Args:
        image: ``[C, H, W]`` as the model took it.
        box: ``(top, left, bottom, right)`` with exclusive ends, e.g. from
            :meth:`featurescope.tap.ReceptiveField.box` (already clipped to the image).
        mean: the per-channel mean the preprocessing subtracted (e.g. a zoo model's
            ``model_metadata(model).preprocessing.mean``); ``None``: the image is unnormalised.
        std: the per-channel standard deviation it divided by.

    Returns:
        ``[C, bottom - top, right - left]`` clipped to ``[0, 1]`` when normalisation was undone.

    Example:
        >>> import torch
        >>> image = torch.zeros(3, 8, 8)  # a mid-grey image, normalised
        >>> p = patch(image, (2, 1, 5, 4), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        >>> p.shape, p.unique().tolist()
        (torch.Size([3, 3, 3]), [0.5])
    """
    top, left, bottom, right = box
    crop = image[:, top:bottom, left:right].detach()
    if mean is None and std is None:
        return crop.clone()
    m = torch.tensor(mean if mean is not None else [0.0] * crop.shape[0], dtype=crop.dtype)
    s = torch.tensor(std if std is not None else [1.0] * crop.shape[0], dtype=crop.dtype)
    return (crop * s[:, None, None] + m[:, None, None]).clamp(0, 1)
