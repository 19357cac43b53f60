"""The preprocessing each zoo model expects, as data rather than code scattered in scripts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from featurescope.errors import FeaturescopeError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# torchvision's InterpolationMode values, without importing torchvision here.
_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class Preprocessing:
    """How to turn an image into a model input: resize, centre-crop, normalise.

    Args:
        resize: the shorter side is resized to this many pixels.
        crop: the centre crop's side, i.e. the model's input size.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
        interpolation: the resize's interpolation, a
            :class:`torchvision.transforms.InterpolationMode` value (``"bilinear"``,
            ``"bicubic"``, ``"nearest"``).

    Example:
        >>> p = Preprocessing(resize=256, crop=227)
        >>> p.input_size
        (3, 227, 227)
        >>> Preprocessing.from_dict(p.to_dict()) == p
        True
    """

    resize: int = 256
    crop: int = 227
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATIONS:
            raise FeaturescopeError(
                f"unknown interpolation {self.interpolation!r}; use one of "
                f"{', '.join(_INTERPOLATIONS)}"
            )

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(3, crop, crop)``, the ``[C, H, W]`` of one preprocessed image."""
        return (3, self.crop, self.crop)

    def transform(self) -> Callable[[Any], torch.Tensor]:
        """A torchvision transform from a PIL image to a normalised ``[3, crop, crop]`` tensor."""
        from torchvision import transforms as T

        transform: Callable[[Any], torch.Tensor] = T.Compose(
            [
                T.Resize(self.resize, interpolation=T.InterpolationMode(self.interpolation)),
                T.CenterCrop(self.crop),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )
        return transform

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation of ``[..., 3, H, W]`` images, clamped to [0, 1] for display."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(3, 1, 1)
        return (images * std + mean).clamp(0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, as stored in manifests and reports."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`."""
        return cls(
            resize=int(d["resize"]),
            crop=int(d["crop"]),
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bilinear")),
        )


#: The study's preprocessing: Resize 256 → CenterCrop 227 → ImageNet mean/std.
STUDY_PREPROCESSING = Preprocessing(resize=256, crop=227)
