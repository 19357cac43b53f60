"""The builtin ``gradcam`` visualizer: Grad-CAM of a zoo model, drawn over its input image.

A plugin module like the visualizers' own (listed in ``DEFAULT_PLUGINS``). It lives here, not
in :mod:`featurescope.visualizers`, because it runs a model: it computes the map with
:func:`featurescope.tap.grad_cam` and draws it with the ``overlay`` visualizer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from featurescope.data.transforms import Preprocessing
from featurescope.errors import FeaturescopeError, VisualizationError
from featurescope.hookspecs import hookimpl
from featurescope.tap import grad_cam
from featurescope.visualizers.overlay import overlay
from featurescope.zoo.metadata import model_metadata, resolve_preprocessing

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["gradcam"]


def gradcam(
    data: Any,
    *,
    model: nn.Module,
    target: int | None = None,
    node: str | None = None,
    preprocessing: Preprocessing | None = None,
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
    title: str | None = None,
    size: float = 4.0,
) -> Figure:
    """Draw where ``model`` looks for a class in one image (Grad-CAM), over that image.

    Args:
        data: one image: a path, a PIL image, or a preprocessed ``[3, H, W]`` tensor.
        model: a classifier torch.fx can trace, e.g. any zoo model.
        target: the class to explain; default the predicted one.
        node: the spatial node to weigh; default the model's last spatial node.
        preprocessing: how to prepare a path or PIL image; default the zoo model's, else the
            study's.
        class_names: label names for the title (default: the zoo model's).
        alpha: the map's opacity, in [0, 1].
        cmap: a matplotlib colormap for the map.
        title: default ``"Grad-CAM: <class> (<node>)"``.
        size: the figure's height in inches.

    Returns:
        A figure with one axes.

    Raises:
        FeaturescopeError: the image cannot be read, or ``target`` is out of range.

    Example:
        >>> import torch, featurescope as fs
        >>> model = fs.create_model("alexnet_half")
        >>> fig = fs.visualize("gradcam", torch.randn(3, 227, 227), model=model, target=2)
        >>> fig.axes[0].get_title()
        'Grad-CAM: class 2 (conv3.6)'
    """
    if not isinstance(model, nn.Module):
        raise VisualizationError(f"model= must be a torch.nn.Module, got {type(model).__name__}")
    prep = resolve_preprocessing(model, preprocessing)
    image = _as_tensor(data, prep)
    cam = grad_cam(model, image[None], node=node, target=target)
    label = int(cam.targets[0])
    meta = model_metadata(model)
    names = class_names if class_names is not None or meta is None else meta.class_names
    name = names[label] if names is not None and label < len(names) else f"class {label}"
    return overlay(
        cam.maps[0],
        image=prep.denormalize(image),
        alpha=alpha,
        cmap=cmap,
        title=title if title is not None else f"Grad-CAM: {name} ({cam.node})",
        size=size,
    )


def _as_tensor(data: Any, prep: Preprocessing) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        if data.dim() == 4 and data.shape[0] == 1:
            data = data[0]
        if data.dim() != 3 or data.shape[0] != 3:
            raise VisualizationError(
                f"gradcam draws one preprocessed image [3, H, W], got shape {list(data.shape)}"
            )
        image: torch.Tensor = data.float()
        return image
    # Decoded as the model's data is (EXIF orientation, 16-bit, transparency), and drawn as
    # the model saw it: the preprocessed crop.
    from PIL import Image

    from featurescope.data.folders import as_rgb, load_rgb

    if isinstance(data, (str, os.PathLike)):
        try:
            data = load_rgb(data)
        except (OSError, ValueError) as exc:
            raise FeaturescopeError(f"cannot read image {os.fspath(data)!r}: {exc}") from exc
    elif isinstance(data, Image.Image):
        data = as_rgb(data)
    tensor: torch.Tensor = prep.transform()(data)
    return tensor


@hookimpl
def featurescope_register_visualizers() -> Mapping[str, Callable[..., Figure]]:
    return {"gradcam": gradcam}
