"""What the explorer page carries about its queries, computed in one forward pass per batch.

The embedding, the class scores and every stage's feature maps come out of one
:class:`~featurescope.FeatureTap` forward of each batch; Grad-CAM (only for a trained head) is
one batched call more. Of each stage the strongest :data:`MAX_CHANNELS` channels travel,
average-pooled down to at most ``MAX_MAP_SIDE`` (32) pixels a side (the page draws them at
``DISPLAY_SIZE``), quantised to 8 bits per channel and zlib-compressed; the page inflates
them with the browser's own ``DecompressionStream``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from featurescope._torch_utils import model_device, training_mode
from featurescope.errors import FeaturescopeError
from featurescope.pages._encode import packed, shrink
from featurescope.pages._schema import MapEntry, Stage
from featurescope.tap import FeatureTap, get_graph_node_names, grad_cam

if TYPE_CHECKING:
    from featurescope.study import ImageSearch

#: Channels of each stage the page carries: the strongest by mean activation.
MAX_CHANNELS = 64
#: Side in pixels of the Grad-CAM maps the page carries.
CAM_SIDE = 56


@dataclass
class QueryAnalysis:
    """One pass over the queries: embeddings, class scores, encoded maps and Grad-CAMs."""

    vectors: torch.Tensor
    predicted: list[int | None]
    stages: list[Stage] = field(default_factory=list)
    cams: list[str | None] = field(default_factory=list)
    cam_node: str | None = None


def _encode_maps(maps: torch.Tensor, max_channels: int) -> MapEntry:
    means = maps.double().mean(dim=(1, 2))
    # Strongest first, ties by channel index (a stable sort of the negated means).
    order = torch.sort(-means, stable=True).indices[:max_channels]
    small = shrink(maps.float())
    return {
        "order": order.tolist(),
        "means": [float(f"{m:.5g}") for m in means[order].tolist()],
        "data": packed(small[order]),
        "sum": packed(small.sum(dim=0)[None]),
    }


def _nodes(model: nn.Module, wanted: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``({node: alias}, {name: alias})``: one tap of ``wanted`` and of the class scores
    (under the name ``"output"``), and where each name's tensor is in its answer.

    A name may be a module prefix (``"fc"``), which torchvision reads as the last node under it;
    resolved here so that a stage that *is* the output (the AlexNets' ``fc``) is tapped once.
    """
    names = [str(n) for n in get_graph_node_names(model)[1]]

    def resolve(query: str) -> str:
        under = [n for n in names if n.startswith(query + ".")]
        return query if query in names or not under else under[-1]

    tapped: dict[str, str] = {}
    where: dict[str, str] = {}
    for query in [*wanted, names[-1]]:
        node = resolve(query)
        where[query] = tapped.setdefault(node, f"n{len(tapped)}")
    where["output"] = where[names[-1]]
    return tapped, where


def channels_first(maps: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` maps, permuted from ``[N, H, W, C]`` where that is what they are (Swin's
    stages): square maps whose channel count differs from their side.

    Example:
        >>> channels_first(torch.zeros(1, 56, 56, 96)).shape
        torch.Size([1, 96, 56, 56])
        >>> channels_first(torch.zeros(1, 96, 56, 56)).shape
        torch.Size([1, 96, 56, 56])
    """
    if maps.shape[1] == maps.shape[2] and maps.shape[2] != maps.shape[3]:
        return maps.permute(0, 3, 1, 2)
    return maps


def stage_label(position: int, shape: Sequence[int]) -> str:
    """A stage's friendly name: ``"stage 1 (56×56)"`` for the first of ``[C, 56, 56]``."""
    return f"stage {position + 1} ({shape[-2]}×{shape[-1]})"


def analyse(
    search: ImageSearch,
    batch: torch.Tensor,
    stages: Sequence[str],
    *,
    trained_head: bool,
    max_map_images: int,
    max_channels: int = MAX_CHANNELS,
    batch_size: int = 16,
) -> QueryAnalysis:
    """Embed ``batch``, score it, and encode its stage maps and Grad-CAMs for the page.

    Args:
        search: the model, its embedding node and the index.
        batch: ``[N, 3, H, W]`` preprocessed queries.
        stages: nodes whose maps are drawn (those that are not ``[C, h, w]`` maps are left out).
        trained_head: whether the class scores mean something (then predictions and Grad-CAM).
        max_map_images: only the first this many queries carry maps and Grad-CAM.
        max_channels: channels of each stage carried, the strongest first.
        batch_size: images per forward.
    """
    model = search.model
    tapped, where = _nodes(model, [search.node, *stages])
    tap = FeatureTap(model, tapped)
    device = model_device(model) or torch.device("cpu")
    vectors, scores = [], []
    encoded: dict[str, list[MapEntry]] = {s: [] for s in stages}
    shapes: dict[str, list[int]] = {}
    with training_mode(model, False), torch.inference_mode():
        for start in range(0, len(batch), batch_size):
            answer = tap(batch[start : start + batch_size].to(device))
            out = {name: answer[alias] for name, alias in where.items()}
            vectors.append(out[search.node].flatten(1).float().cpu())
            logits = out["output"]
            if isinstance(logits, torch.Tensor) and logits.dim() == 2:
                scores.append(logits.float().cpu())
            keep = max(0, min(batch_size, max_map_images - start))
            for stage in stages:
                maps = out[stage]
                if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or not keep:
                    continue  # class scores and token sequences are not drawn as maps
                maps = channels_first(maps)
                shapes[stage] = list(maps.shape[1:])
                encoded[stage] += [
                    _encode_maps(one, max_channels) for one in maps[:keep].float().cpu()
                ]
    vectors_all = torch.cat(vectors)
    classifier = len(scores) == len(vectors)  # every batch's output was a [n, classes] score
    predicted: list[int | None] = (
        torch.cat(scores).argmax(dim=1).tolist()
        if classifier and trained_head
        else [None] * len(batch)
    )
    drawn = [s for s in stages if s in shapes]
    maps_out: list[Stage] = []
    for position, stage in enumerate(drawn):
        shipped = list(shrink(torch.zeros(1, *shapes[stage][1:])).shape[1:])
        maps_out.append(
            {
                "name": stage,
                "label": stage_label(position, shapes[stage]),
                "shape": shapes[stage],
                "shipped": [min(max_channels, shapes[stage][0]), *shipped],
                "maps": encoded[stage],
            }
        )
    analysis = QueryAnalysis(vectors_all, predicted, maps_out)
    if classifier and trained_head:
        # A model with no map to explain: the page shows no Grad-CAM, and says so.
        with contextlib.suppress(FeaturescopeError):
            analysis.cams, analysis.cam_node = _grad_cams(
                model, batch[:max_map_images], predicted[:max_map_images], batch_size
            )
    return analysis


def _grad_cams(
    model: nn.Module, batch: torch.Tensor, targets: Sequence[int | None], batch_size: int
) -> tuple[list[str | None], str | None]:
    """Grad-CAM of each image's predicted class, a batch at a time, packed for the page."""
    cams: list[str | None] = []
    node: str | None = None
    for start in range(0, len(batch), batch_size):
        chunk = batch[start : start + batch_size]
        wanted = [int(t or 0) for t in targets[start : start + batch_size]]
        cam = grad_cam(model, chunk, node=node, target=wanted)
        node = cam.node  # found once, by the default rule, then reused
        small = F.adaptive_avg_pool2d(cam.maps[:, None], CAM_SIDE)[:, 0]
        cams += [packed(one[None]) for one in small]
    return cams, node


def load_queries(
    search: ImageSearch, paths: Sequence[str]
) -> tuple[torch.Tensor | None, list[int], list[str]]:
    """The queries that decode, preprocessed: ``(batch, their positions, unreadable paths)``."""
    from featurescope.data.folders import load_rgb

    transform = search.preprocessing.transform()
    tensors, kept, failed = [], [], []
    for position, path in enumerate(paths):
        try:
            tensors.append(transform(load_rgb(path)))
        except (OSError, ValueError):
            failed.append(path)
            continue
        kept.append(position)
    return (torch.stack(tensors) if tensors else None), kept, failed


def head_classes(model: nn.Module) -> list[str] | None:
    """The class names of ``model``'s head when it is trained, else ``None``.

    Trained means weights that are not random and a head that knows its classes: class names
    in the metadata (a checkpoint trained on a folder), or the pretrained head itself (ImageNet
    names from torchvision's weights, else ``"class i"``). A pretrained backbone whose head
    was replaced for another class count has a fresh, random head.

    Example:
        >>> import featurescope as fs
        >>> head_classes(fs.create_model("alexnet")) is None  # random weights
        True
    """
    from featurescope.zoo import get_model_info, model_metadata

    meta = model_metadata(model)
    if meta is None or meta.weights == "random":
        return None
    if meta.class_names is not None:
        return list(meta.class_names)
    source, _, tag = meta.weights.partition(":")
    if source == "checkpoint":
        return None
    try:
        pretrained_classes = get_model_info(meta.architecture).pretrained_classes
    except Exception:  # an architecture no longer registered: say nothing about its head
        return None
    if pretrained_classes != meta.num_classes:
        return None
    return _pretrained_names(meta.architecture, source, tag) or [
        f"class {i}" for i in range(meta.num_classes)
    ]


def _pretrained_names(architecture: str, source: str, tag: str) -> list[str] | None:
    if source != "torchvision":
        return None
    try:
        from torchvision.models import get_model_weights

        # The zoo's "tv_alexnet" is torchvision's "alexnet".
        enum = get_model_weights(architecture.removeprefix("tv_"))
        return list(enum[tag].meta["categories"])
    except Exception:  # no such weights in this torchvision: indices will do
        return None
