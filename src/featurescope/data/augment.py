"""Training-time augmentation that keeps the study's input geometry (227×227 crops of 256)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from featurescope.data.transforms import STUDY_PREPROCESSING, Preprocessing

__all__ = ["train_transform"]


def train_transform(
    preprocessing: Preprocessing = STUDY_PREPROCESSING,
    *,
    flip: bool = True,
    random_crop: bool = True,
) -> Callable[[Any], torch.Tensor]:
    """The study's preprocessing with a random crop and flip in place of the centre crop.

    Resize the shorter side to ``preprocessing.resize``, take a random ``crop``×``crop`` window
    (instead of the centre one) and flip it left-right half the time, then normalise. The output
    has the same shape and statistics as :meth:`Preprocessing.transform`, so evaluation uses the
    plain preprocessing unchanged.

    Args:
        preprocessing: sizes and normalisation; default: the study's.
        flip: random horizontal flips.
        random_crop: random crop position (``False``: centre crop).

    Returns:
        A transform from a PIL image to a ``[3, crop, crop]`` tensor.

    Example:
        >>> from PIL import Image
        >>> tf = train_transform()
        >>> tuple(tf(Image.new("RGB", (128, 128))).shape)
        (3, 227, 227)
    """
    from torchvision import transforms as T

    crop = T.RandomCrop(preprocessing.crop) if random_crop else T.CenterCrop(preprocessing.crop)
    steps: list[Any] = [T.Resize(preprocessing.resize), crop]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(preprocessing.mean, preprocessing.std)]
    return T.Compose(steps)  # type: ignore[no-any-return]
