"""Every torchvision classification model, by torchvision's own name, as a builtin zoo plugin.

Each entry is read off torchvision itself, never written out per family: its preprocessing from
its default weights' transforms (resize, crop, mean, std, interpolation), its embedding node (the
input of its final classifier ``Linear``) and its stage nodes (where the spatial resolution
changes) from a trace of the built model, shapes propagated with fake tensors so that nothing is
computed. Pretrained weights are fetched as torchvision fetches them: into torch's hub cache
(``torch.hub.get_dir()/checkpoints``), their SHA-256 prefix checked, and read from there by
torchvision's own loader; a file already there is used without a request, and with
``FEATURESCOPE_OFFLINE=1`` nothing is downloaded (see :mod:`featurescope.zoo._download`).
torchvision's ``alexnet`` is ``tv_alexnet`` here: ``alexnet`` is the study's.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featurescope.data.transforms import Preprocessing
from featurescope.errors import FeaturescopeError
from featurescope.hookspecs import hookimpl
from featurescope.zoo._download import fetch_url
from featurescope.zoo._registry import ModelSpec

__all__ = ["describe", "fetch_weights", "torchvision_names", "tv_alexnet"]

#: Stage nodes picked from a model whose resolution never changes (ViT): this many blocks.
TOKEN_STAGES = 4
#: Families whose reshapes (window partitions) fool the resolution rule: the container whose
#: children are the stages.
STAGE_CONTAINERS = {"maxvit_": "blocks"}


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """The classification models torchvision lists (``list_models(module=torchvision.models)``)."""
    import torchvision.models

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _weights_enum(name: str) -> Any:
    from torchvision.models import get_model_weights

    return get_model_weights(name)


def _preprocessing(weights: Any) -> Preprocessing:
    t = weights.transforms()
    return Preprocessing(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        mean=tuple(float(v) for v in t.mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in t.std),  # type: ignore[arg-type]
        interpolation=str(t.interpolation.value),
    )


def _resolve_weights(name: str, weights: Any) -> Any:
    enum = _weights_enum(name)
    if weights is True:
        return enum.DEFAULT
    try:
        return enum.verify(weights)
    except (ValueError, KeyError) as exc:
        known = ", ".join(w.name for w in enum)
        raise FeaturescopeError(
            f"unknown weights {weights!r} for {name}; use one of {known}, or True"
        ) from exc


def fetch_weights(name: str, weights: Any = True) -> Path:
    """The file of ``name``'s pretrained weights in torch's hub cache, downloaded if missing.

    Args:
        name: a torchvision model name (``"resnet18"``).
        weights: ``True`` for its default weights, or a tag (``"IMAGENET1K_V2"``) or member of
            its weights enum.

    Raises:
        WeightsUnavailableError: the file is not cached and could not be downloaded.
    """
    enum = _resolve_weights(name, weights)
    return fetch_url(enum.url, what=f"{enum.name} weights of {name}", check_hash=True)


def _classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """The final classifier layer: the last ``Linear``, else (SqueezeNet) the last ``Conv2d``."""
    for kind in (nn.Linear, nn.Conv2d):
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
        if layers:
            return layers[-1]
    raise FeaturescopeError(f"{type(model).__name__} has no Linear or Conv2d classifier")


def _replace_head(model: nn.Module, num_classes: int) -> None:
    name, head = _classifier(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    bias = head.bias is not None
    if isinstance(head, nn.Linear):
        new: nn.Module = nn.Linear(head.in_features, num_classes, bias=bias)
    else:
        assert isinstance(head, nn.Conv2d)
        new = nn.Conv2d(head.in_channels, num_classes, 1, bias=bias)  # torchvision's heads are 1×1
    setattr(parent, attr, new)


def build(name: str, num_classes: int = 1000, weights: Any = None, **kwargs: Any) -> nn.Module:
    """torchvision's ``get_model(name)``; pretrained weights are fetched first if not cached.

    With weights and ``num_classes`` other than theirs, the final ``Linear`` is replaced by a
    freshly initialised one, ready for fine-tuning.

    Raises:
        WeightsUnavailableError: the weights' file is not cached and could not be downloaded.
    """
    from torchvision.models import get_model

    with warnings.catch_warnings():
        # GoogLeNet and Inception warn that their default init will change; not the user's doing.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torchvision")
        if not weights:
            if name.startswith("vit_") and "image_size" not in kwargs:
                # A ViT's input size is part of its architecture: build it for its weights' crop.
                kwargs["image_size"] = _preprocessing(_weights_enum(name).DEFAULT).crop
            return get_model(name, weights=None, num_classes=num_classes, **kwargs)  # type: ignore[no-any-return]
        enum = _resolve_weights(name, weights)
        # torchvision's loader then finds the file where it would have put it: no request.
        fetch_weights(name, enum)
        model: nn.Module = get_model(name, weights=enum, **kwargs)
    if num_classes != len(enum.meta["categories"]):
        _replace_head(model, num_classes)
    return model


def tv_alexnet(num_classes: int = 5, weights: Any = None, **kwargs: Any) -> nn.Module:
    """torchvision's AlexNet (64-192-384-256-256, 4096-wide classifier)."""
    return build("alexnet", num_classes=num_classes, weights=weights, **kwargs)


def _node_names(model: nn.Module) -> tuple[Any, dict[Any, str]]:
    import torchvision.ops
    from torchvision.models.feature_extraction import NodePathTracer

    # The tracer settings of torchvision's get_graph_node_names (and so of FeatureTap): its ops'
    # modules are leaves and its ops' functions are wrapped, which gives their nodes their names.
    ops = [
        m
        for m in vars(torchvision.ops).values()
        if isinstance(m, type) and issubclass(m, nn.Module)
    ]
    tracer = NodePathTracer(autowrap_modules=(math, torchvision.ops), leaf_modules=ops)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tracer.trace(model)
    return torch.fx.GraphModule(tracer.root, graph), tracer.node_to_qualname


def _propagate(gm: torch.fx.GraphModule, size: tuple[int, int, int]) -> None:
    x = torch.zeros(1, *size)
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x)
    except Exception:
        # Some kernels have no fake implementation: compute the shapes for real.
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(gm).propagate(x)


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    shape = getattr(val, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _spatial(shape: tuple[int, ...]) -> tuple[int, int] | None:
    if len(shape) != 4:
        return None
    if shape[2] == shape[3] or shape[1] != shape[2]:
        return shape[2], shape[3]  # [N, C, H, W]
    return shape[1], shape[2]  # channels-last [N, H, W, C] (Swin)


def _main_path(nodes: list[Any]) -> list[Any]:
    """The nodes every path from the input to the output goes through (block outputs).

    In a graph listed in topological order, a node is on every path when no edge from a node
    the input reaches jumps over it; branches (attention internals, a residual's body) and
    constants never are.
    """
    position = {node: i for i, node in enumerate(nodes)}
    reached: set[Any] = set()
    spans = [0] * (len(nodes) + 1)
    for node in nodes:
        if node.op == "placeholder" or any(a in reached for a in node.all_input_nodes):
            reached.add(node)
        for source in node.all_input_nodes:
            if source in reached and source in position:
                start, stop = position[source] + 1, position[node]
                if start < stop:
                    spans[start] += 1
                    spans[stop] -= 1
    path, open_spans = [], 0
    for i, node in enumerate(nodes):
        open_spans += spans[i]
        if node in reached and open_spans == 0:
            path.append(node)
    return path


def _resolution_stages(
    nodes: list[Any], qualname: dict[Any, str], input_size: tuple[int, int, int]
) -> list[str]:
    """The last main-path node at each spatial resolution below the input's, above 1×1."""
    stages: list[str] = []
    current: tuple[int, int] | None = None
    previous: str | None = None
    for node in _main_path(nodes):
        shape = _shape(node)
        spatial = _spatial(shape) if shape is not None and shape[0] == 1 else None
        if spatial is None or node not in qualname:
            continue
        if spatial != current and previous is not None:
            stages.append(previous)
        current, previous = spatial, qualname[node]
    if previous is not None:
        stages.append(previous)
    # The input's own resolution and pooled 1×1 maps are not worth drawing.
    sizes = {qualname[n]: _spatial(_shape(n) or ()) for n in nodes if n in qualname}
    return [s for s in stages if sizes.get(s) not in (tuple(input_size[1:]), (1, 1))]


def _last_inside(names: list[str], prefix: str) -> str | None:
    inside = [n for n in names if n == prefix or n.startswith(prefix + ".")]
    return inside[-1] if inside else None


def _block_stages(model: nn.Module, names: list[str]) -> tuple[str, ...]:
    """For token models: the output of evenly spaced blocks of the longest block list."""
    lists = [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential | nn.ModuleList)
    ]
    if not lists:
        return ()
    prefix, blocks = max(lists, key=lambda item: len(item[1]))
    count = len(blocks)
    picks = sorted({round(count * (i + 1) / TOKEN_STAGES) - 1 for i in range(TOKEN_STAGES)})
    stages = []
    for i in picks:
        child = f"{prefix}.{list(blocks._modules)[i]}" if prefix else list(blocks._modules)[i]
        last = _last_inside(names, child)
        if last:
            stages.append(last)
    return tuple(stages)


def describe(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, Any]:
    """A classification model's embedding node and stage nodes, found by rule.

    * embedding node: the node whose output the final ``Linear`` takes;
    * stage nodes: the last node at each spatial resolution, from the first downsampling on;
      for a model whose resolution never changes (ViT), evenly spaced blocks.

    Names are torchvision's (:func:`~torchvision.models.feature_extraction.get_graph_node_names`),
    which :class:`~featurescope.FeatureTap` takes.

    Example:
        >>> import torchvision
        >>> facts = describe(torchvision.models.resnet18(), (3, 224, 224))
        >>> facts["embedding_node"], facts["stage_nodes"][-1]
        ('flatten', 'layer4.1.relu_1')
    """
    was_training = model.training
    model.eval()
    try:
        gm, qualname = _node_names(model)
        _propagate(gm, input_size)
    except Exception:
        # Not traceable, or not at this input size (a ViT built for another image_size): no
        # nodes by rule; FeatureTap still taps it by name.
        return {}
    finally:
        model.train(was_training)
    head, _ = _classifier(model)
    nodes = list(gm.graph.nodes)
    names = [qualname[n] for n in nodes if n in qualname]
    embedding = None
    for node in nodes:
        if node.op == "call_module" and node.target == head and node.args:
            source = node.args[0]
            embedding = qualname.get(source)
    container = next(
        (
            c
            for prefix, c in STAGE_CONTAINERS.items()
            if type(model).__name__.lower().startswith(prefix.rstrip("_"))
        ),
        None,
    )
    stages: list[str]
    if container is not None:
        found = [
            _last_inside(names, f"{container}.{child}")
            for child in model.get_submodule(container)._modules
        ]
        stages = [s for s in found if s]
    else:
        stages = _resolution_stages(nodes, qualname, input_size)
    if len(stages) < 2:
        stages = list(_block_stages(model, names))
    return {"embedding_node": embedding, "stage_nodes": tuple(stages)}


def _spec(name: str) -> ModelSpec:
    weights = _weights_enum(name).DEFAULT
    preprocessing = _preprocessing(weights)
    return ModelSpec(
        functools.partial(build, name),
        preprocessing,
        f"torchvision's {name} ({weights.meta['num_params'] / 1e6:.1f} M parameters at "
        f"1000 classes)",
        weights=weights.name,
        weights_source="torchvision",
        pretrained_classes=len(weights.meta["categories"]),
        pretrained_class_names=tuple(weights.meta["categories"]),
        describe=describe,
        fetch=functools.partial(fetch_weights, name),
    )


@hookimpl
def featurescope_register_models() -> Mapping[str, ModelSpec]:
    # torchvision's "alexnet" is the study's AlexNet here (featurescope.zoo.alexnet); torchvision's
    # own keeps the name it has always had in featurescope.
    specs = {name: _spec(name) for name in torchvision_names() if name != "alexnet"}
    alexnet = _spec("alexnet")
    specs["tv_alexnet"] = ModelSpec(
        tv_alexnet,
        alexnet.preprocessing,
        "torchvision's AlexNet, convs 64-192-384-256-256, 4096-wide classifier (alias of alexnet "
        "in torchvision's naming)",
        weights=alexnet.weights,
        weights_source=alexnet.weights_source,
        pretrained_classes=alexnet.pretrained_classes,
        pretrained_class_names=alexnet.pretrained_class_names,
        describe=describe,
        fetch=alexnet.fetch,
    )
    return specs
