"""The study's AlexNets, full width and the single-GPU half, built from its named stages.

A builtin plugin: it adds ``alexnet`` and ``alexnet_half`` to the zoo through
:func:`~featurescope.hookspecs.featurescope_register_models`, as any third-party plugin would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx
from torch import nn

from featurescope.data.transforms import STUDY_PREPROCESSING
from featurescope.errors import FeaturescopeError, InputShapeError
from featurescope.hookspecs import hookimpl
from featurescope.zoo._registry import ModelSpec

__all__ = ["FULL_WIDTHS", "HALF_WIDTHS", "AlexNet", "alexnet", "alexnet_half"]

#: Conv widths of the original two-GPU AlexNet, and of one of its two halves.
FULL_WIDTHS: tuple[int, int, int, int, int] = (96, 256, 384, 384, 256)
HALF_WIDTHS: tuple[int, int, int, int, int] = (48, 128, 192, 192, 128)

INPUT_SIZE = 227


def check_input_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Raise :class:`InputShapeError` unless ``x`` is ``[N, 3, size, size]``; return ``x``.

    Wrapped with :func:`torch.fx.wrap`, so a traced graph keeps the check as one node
    (``check_input_size``) instead of failing to trace a branch on a shape.
    """
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
        got = "[" + ", ".join(str(s) for s in x.shape) + "]"
        raise InputShapeError(
            f"AlexNet expects images of shape [N, 3, {size}, {size}], got {got}. "
            f"Preprocess with Resize(256) → CenterCrop({size}) "
            "(featurescope.zoo.model_spec(name).preprocessing.transform()); "
            "224×224 crops do not fit the classifier's 6×6 input."
        )
    return x


torch.fx.wrap("check_input_size")


class AlexNet(nn.Module):
    """AlexNet as the study builds it: stages ``conv1``, ``conv2``, ``conv3`` and ``fc``.

    On a ``[N, 3, 227, 227]`` input, ``conv1`` gives ``[N, w1, 27, 27]``, ``conv2``
    ``[N, w2, 13, 13]`` and ``conv3`` ``[N, w5, 6, 6]``; ``fc`` is the 2048-wide classifier
    ``Linear → ReLU → Dropout → Linear → ReLU → Linear``. Its last hidden layer (``fc.4``, the
    ReLU after the second linear layer) is the 2048-d embedding used for search by image.

    Args:
        num_classes: outputs of the last linear layer.
        widths: the five conv widths.
        hidden: width of the two hidden linear layers.
        dropout: dropout probability after the first linear layer.

    Example:
        >>> model = AlexNet(num_classes=5)
        >>> model.conv1(torch.zeros(1, 3, 227, 227)).shape
        torch.Size([1, 96, 27, 27])
    """

    def __init__(
        self,
        num_classes: int = 5,
        widths: Sequence[int] = FULL_WIDTHS,
        hidden: int = 2048,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if len(widths) != 5:
            raise FeaturescopeError(f"AlexNet needs five conv widths, got {list(widths)}")
        w1, w2, w3, w4, w5 = (int(w) for w in widths)
        self.widths = (w1, w2, w3, w4, w5)
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, w1, kernel_size=11, stride=4),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(w1, w2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.conv3 = nn.Sequential(
            nn.Conv2d(w2, w3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w3, w4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(w4, w5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.fc = nn.Sequential(
            nn.Linear(w5 * 6 * 6, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        # The study also saved state dicts from a torchvision-style ``features``/``classifier``
        # layout; renaming at load time lets plain ``load_state_dict`` read them.
        self._register_load_state_dict_pre_hook(_remap_features_classifier_layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input_size(x, INPUT_SIZE)
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.conv3(x)
        x = torch.flatten(x, 1)
        return self.fc(x)  # type: ignore[no-any-return]


_CONV_TARGETS = ("conv1.0", "conv2.0", "conv3.0", "conv3.2", "conv3.4")
_LINEAR_TARGETS = ("fc.0", "fc.3", "fc.5")


def _remap_features_classifier_layout(
    state_dict: dict[str, torch.Tensor], prefix: str, *args: object
) -> None:
    """Rename ``features.<i>.*``/``classifier.<j>.*`` keys to ``conv*.*``/``fc.*`` in place.

    The ``i`` (and ``j``) that hold weights are matched in numeric order to the five convs (and
    three linears), so both ``Linear, ReLU, Dropout, ...`` and torchvision's dropout-first
    classifier layouts map. Anything that does not fit is left for ``load_state_dict`` to report.
    """
    for group, targets in (("features", _CONV_TARGETS), ("classifier", _LINEAR_TARGETS)):
        head = f"{prefix}{group}."
        keys = [k for k in state_dict if k.startswith(head)]
        indices = sorted({k[len(head) :].split(".", 1)[0] for k in keys}, key=_numeric)
        if len(indices) != len(targets) or not all(i.isdigit() for i in indices):
            continue
        rename = dict(zip(indices, targets, strict=True))
        for key in keys:
            index, rest = key[len(head) :].split(".", 1)
            state_dict[f"{prefix}{rename[index]}.{rest}"] = state_dict.pop(key)


def _numeric(s: str) -> tuple[int, str]:
    return (int(s), "") if s.isdigit() else (1 << 30, s)


def alexnet(num_classes: int = 5, **kwargs: object) -> AlexNet:
    """The study's full-width AlexNet (96-256-384-384-256), 2048-wide classifier."""
    return AlexNet(num_classes=num_classes, widths=FULL_WIDTHS, **kwargs)  # type: ignore[arg-type]


def alexnet_half(num_classes: int = 5, **kwargs: object) -> AlexNet:
    """Every conv width halved (48-128-192-192-128): one GPU's half of the original AlexNet."""
    return AlexNet(num_classes=num_classes, widths=HALF_WIDTHS, **kwargs)  # type: ignore[arg-type]


_STAGES = ("conv1", "conv2", "conv3", "fc")
#: The last hidden layer: the ReLU after the second linear layer, 2048-d.
EMBEDDING_NODE = "fc.4"


@hookimpl
def featurescope_register_models() -> Mapping[str, ModelSpec]:
    return {
        "alexnet": ModelSpec(
            alexnet,
            STUDY_PREPROCESSING,
            "the study's AlexNet, convs 96-256-384-384-256, 2048-wide classifier",
            _STAGES,
            EMBEDDING_NODE,
        ),
        "alexnet_half": ModelSpec(
            alexnet_half,
            STUDY_PREPROCESSING,
            "AlexNet with every conv halved, 48-128-192-192-128 (one GPU's half)",
            _STAGES,
            EMBEDDING_NODE,
        ),
    }
