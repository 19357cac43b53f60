"""Build a registered model by name: torchvision's ``get_model`` and timm's ``create_model``.

:func:`create_model` is the one place a zoo model is made, so it is the one place its
:class:`~featurescope.zoo.ModelMetadata` is set; :func:`load_checkpoint` and
:func:`convert_checkpoint` build through it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featurescope.errors import (
    CheckpointError,
    FeaturescopeError,
    PluginError,
    UnsafeCheckpointError,
)
from featurescope.plugins import DEFAULT_PLUGINS, plugin_raised
from featurescope.zoo._registry import DECORATED, ModelSpec, model_spec
from featurescope.zoo.checkpoints import (
    infer_num_classes,
    load_weights,
    read_checkpoint_metadata,
    read_pickled_state_dict,
    read_state_dict,
    save_checkpoint,
    tensor_shapes,
    weights_tag,
)
from featurescope.zoo.metadata import ModelMetadata, attach_metadata

__all__ = [
    "DEFAULT_NUM_CLASSES",
    "convert_checkpoint",
    "create_model",
    "fetch_weights",
    "load_checkpoint",
]

#: Classes of a model built without pretrained weights, a checkpoint or class names: the study's 5.
DEFAULT_NUM_CLASSES = 5
PathLike = str | os.PathLike[str]


def _pretrained_kwargs(spec: ModelSpec, pretrained: bool | str) -> tuple[dict[str, Any], str]:
    if not pretrained:
        return {}, "random"
    if spec.weights is None:
        raise FeaturescopeError(
            f"model {spec.name!r} has no pretrained weights; build it with pretrained=False, or "
            "load your own with checkpoint=..."
        )
    tag = spec.weights if pretrained is True else str(pretrained)
    return {"weights": tag}, f"{spec.weights_source or spec.plugin}:{tag}"


def _num_classes(
    spec: ModelSpec,
    num_classes: int | None,
    names: list[str] | None,
    checkpoint_meta: dict[str, Any],
    checkpoint: PathLike | None,
    pretrained: bool | str,
) -> int:
    if num_classes is None and names is not None:
        num_classes = len(names)
    if num_classes is None and checkpoint is not None:
        recorded = checkpoint_meta.get("num_classes")
        # A plain state dict records nothing: its classifier's size says it.
        num_classes = (
            int(recorded)
            if recorded is not None
            else infer_num_classes(read_state_dict(checkpoint))
        )
    if num_classes is None and pretrained and spec.pretrained_classes is not None:
        num_classes = spec.pretrained_classes
    num_classes = DEFAULT_NUM_CLASSES if num_classes is None else num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise FeaturescopeError(f"num_classes must be a positive integer, got {num_classes!r}")
    return num_classes


def _values(count: int) -> str:
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.1f} {unit} values"
    return f"{count} values"


def _check_fits_the_file(
    spec: ModelSpec, num_classes: int, kwargs: dict[str, Any], checkpoint: PathLike
) -> None:
    """Refuse, before anything is allocated, a model larger than the checkpoint's tensors.

    A checkpoint's metadata is untrusted: ``num_classes=3000000`` would make the builder
    allocate gigabytes before the first shape is compared. The model is built on the ``meta``
    device (shapes, no memory) and its size compared with the tensors the file's header
    declares, which are bounded by the file's length. A strict load needs a tensor for every
    value of the model, so a model larger than the file can never load.
    """
    shapes = tensor_shapes(checkpoint)
    if shapes is None:  # a .pt state dict carries no metadata to distrust
        return
    try:
        with torch.device("meta"):
            probe: Any = spec.builder(num_classes=num_classes, **kwargs)
        # Not a module: create_model reports that after the real build.
        needed = sum(t.numel() for t in probe.state_dict().values())
    except (Exception, SystemExit):  # cannot build on meta: the real build reports or loads
        return
    present = sum(math.prod(shape) for shape in shapes.values())
    if needed > present:
        raise CheckpointError(
            f"{checkpoint}: {spec.name} with num_classes={num_classes} has {_values(needed)} "
            f"but the file holds only {_values(present)}, so its weights cannot fit; the "
            "checkpoint's metadata does not match its tensors (a corrupt or forged file), or "
            "num_classes= is wrong"
        )


def _build(spec: ModelSpec, num_classes: int, kwargs: dict[str, Any]) -> Any:
    """Call a model's builder; a third-party plugin's failure (even ``sys.exit``) names it."""
    try:
        return spec.builder(num_classes=num_classes, **kwargs)
    except FeaturescopeError:
        raise
    except (Exception, SystemExit) as exc:
        # A builtin's or the user's own (@register_model) builder keeps its exception: a
        # TypeError there is a wrong argument, not a broken plugin.
        if isinstance(exc, SystemExit) or spec.plugin not in (*DEFAULT_PLUGINS, DECORATED):
            where = f"the builder of model {spec.name!r}"
            raise plugin_raised(spec.plugin, where, exc) from exc
        raise


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    pretrained: bool | str = False,
    checkpoint: PathLike | None = None,
    class_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model by name, with random, pretrained or checkpointed weights.

    Args:
        name: a name from :func:`~featurescope.list_models` (``"alexnet"``, ``"resnet50"``,
            ``"timm/resnet18"`` when timm is installed).
        num_classes: size of the classifier's output. Defaults to ``len(class_names)``, to the
            checkpoint's (recorded, or read off a plain state dict's classifier), to the
            pretrained weights' (1000 for ImageNet), else to 5 (the study's classes).
        pretrained: ``True`` for the model's default pretrained weights, or a weights tag
            (``"IMAGENET1K_V2"``). They are fetched and cached as their library does it
            (torchvision's into torch's hub cache, hash checked; timm's through
            ``huggingface_hub`` into its cache) and a cached file is used without a request;
            ``FEATURESCOPE_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` forbids downloading (see
            :func:`fetch_weights`). With ``num_classes`` other than theirs, the classifier is
            freshly initialised.
        checkpoint: a featurescope ``.safetensors`` checkpoint or a ``.pt``/``.pth`` state
            dict (read with ``weights_only=True``). Pickled whole models are refused; see
            ``featurescope convert``.
        class_names: the label names in class-index order (default: the checkpoint's, or
            the pretrained weights' where the zoo knows them and the head is theirs).
        **kwargs: passed to the model's builder.

    Returns:
        The model, in eval mode when weights were loaded, carrying its
        :class:`~featurescope.zoo.ModelMetadata` (read it with
        :func:`~featurescope.model_metadata`).

    Raises:
        UnknownNameError: no model has that name (the message names the closest).
        WeightsUnavailableError: pretrained weights are not cached and downloading them is
            off or failed; the message names the file, its URL and its cache folder.

    Example:
        >>> model = create_model("alexnet")
        >>> sum(p.numel() for p in model.parameters())
        26830213
        >>> from featurescope import model_metadata
        >>> model_metadata(model).num_classes, model_metadata(model).weights
        (5, 'random')
    """
    spec = model_spec(name)
    if not pretrained and kwargs.get("weights"):
        pretrained = kwargs.pop("weights")  # torchvision's spelling of the same request
    kwargs.pop("weights", None)
    if pretrained and checkpoint is not None:
        raise FeaturescopeError("give pretrained=... or checkpoint=..., not both")
    names = list(class_names) if class_names is not None else None
    meta: dict[str, Any] = read_checkpoint_metadata(checkpoint) if checkpoint is not None else {}
    if names is None and meta.get("class_names") is not None:
        names = list(meta["class_names"])
    n = _num_classes(spec, num_classes, names, meta, checkpoint, pretrained)
    if names is None and pretrained and len(spec.pretrained_class_names or ()) == n:
        names = list(spec.pretrained_class_names or ())  # the weights' own head keeps its labels
    if names is not None and len(names) != n:
        raise FeaturescopeError(f"{len(names)} class names given for {n} classes")
    extra, weights = _pretrained_kwargs(spec, pretrained)
    if checkpoint is not None:
        _check_fits_the_file(spec, n, kwargs, checkpoint)
    model = _build(spec, n, {**extra, **kwargs})
    if not isinstance(model, nn.Module):
        raise PluginError(
            f"the builder of model {name!r} (plugin {spec.plugin!r}) returned "
            f"{type(model).__name__}, not a torch.nn.Module"
        )
    if checkpoint is not None:
        load_weights(model, checkpoint)
        weights = weights_tag(checkpoint)
    embedding_node, stages = spec.embedding_node, spec.stages
    if (
        spec.describe is not None
        and spec.input_size is not None
        and not (embedding_node and stages)
    ):
        facts = spec.describe(model, spec.input_size)
        embedding_node = embedding_node or facts.get("embedding_node")
        stages = stages or tuple(facts.get("stage_nodes", ()))
    attach_metadata(
        model,
        ModelMetadata(
            architecture=name,
            num_classes=n,
            class_names=tuple(names) if names is not None else None,
            preprocessing=spec.preprocessing,
            input_size=spec.input_size,
            embedding_node=embedding_node,
            stage_nodes=stages,
            weights=weights,
        ),
    )
    if weights != "random":
        model.eval()
    return model


def fetch_weights(name: str, weights: bool | str = True) -> Path:
    """Put a zoo model's pretrained weights in their library's cache, for offline use later.

    The file goes exactly where the model's library would put it (torch's hub cache for
    torchvision, Hugging Face's hub cache or torch's for timm), so ``create_model(name,
    pretrained=...)``, torchvision and timm all find it there without a request. A file already
    cached is not fetched again. ``featurescope weights fetch`` calls this.

    Args:
        name: a name from :func:`~featurescope.list_models`.
        weights: ``True`` for the model's default pretrained weights, or a weights tag.

    Returns:
        The cached file.

    Raises:
        UnknownNameError: no model has that name.
        FeaturescopeError: the model has no pretrained weights (or none with that tag).
        WeightsUnavailableError: the download is off (``FEATURESCOPE_OFFLINE=1``) or failed;
            the message names the file, its URL and its cache folder.

    Example:
        >>> try:
        ...     fetch_weights("alexnet")
        ... except FeaturescopeError as err:
        ...     print(err)
        model 'alexnet' has no pretrained weights; build it with pretrained=False, or load your own with checkpoint=...
    """
    spec = model_spec(name)
    if not weights:
        raise FeaturescopeError(f"weights must be True or a weights tag, got {weights!r}")
    extra, _ = _pretrained_kwargs(spec, weights)
    if spec.fetch is None:
        raise FeaturescopeError(
            f"model {name!r} (plugin {spec.plugin!r}) has pretrained weights but no way to fetch "
            "them alone; create_model(name, pretrained=True) fetches them while building"
        )
    return spec.fetch(extra["weights"])


def load_checkpoint(
    path: PathLike,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a model from a checkpoint, in eval mode.

    A featurescope checkpoint names its architecture. A plain ``.pt``/``.pth`` state dict does
    not: pass ``model_name`` (and ``num_classes`` if its last layer's size is not the number of
    classes).

    Example:
        >>> import tempfile, featurescope as fs
        >>> path = fs.zoo.save_checkpoint(fs.create_model("alexnet"), tempfile.mkdtemp() + "/a.safetensors")
        >>> fs.model_metadata(fs.zoo.load_checkpoint(path)).architecture
        'alexnet'
    """
    meta = read_checkpoint_metadata(path)
    name = model_name or meta.get("model")
    if name is None:
        raise CheckpointError(
            f"{path} does not record its architecture (a plain state dict); pass "
            "model_name=... (see featurescope.list_models()), or re-save it with "
            "featurescope.zoo.save_checkpoint"
        )
    model = create_model(name, num_classes=num_classes, checkpoint=path)
    return model.to(map_location)


def convert_checkpoint(
    src: PathLike,
    dst: PathLike,
    *,
    model_name: str,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Convert a ``.pt``/``.pth`` checkpoint, even a pickled whole model, to a safe checkpoint.

    The weights are loaded into ``model_name``'s architecture (so both of the study's layouts
    work) and written with :func:`save_checkpoint`. A pickled model's class need not be
    importable: its tensors are recovered without its code.

    Args:
        trust_pickle: required to read a file that needs unpickling, which runs code the file
            contains. Only set it for files from a source you trust.

    Raises:
        UnsafeCheckpointError: the file needs unpickling and ``trust_pickle`` is false.

    Example:
        >>> import tempfile, torch, featurescope as fs
        >>> folder = tempfile.mkdtemp()
        >>> torch.save(fs.create_model("alexnet_half"), folder + "/pickled.pt")  # a whole model
        >>> out = fs.zoo.convert_checkpoint(folder + "/pickled.pt", folder + "/safe.safetensors",
        ...                                 model_name="alexnet_half", trust_pickle=True)
        >>> fs.model_metadata(fs.zoo.load_checkpoint(out)).architecture
        'alexnet_half'
    """
    source = Path(src)
    if not source.is_file():
        raise CheckpointError(f"checkpoint {str(source)!r} does not exist or is not a file")
    try:
        state = read_state_dict(source)
    except UnsafeCheckpointError:
        if not trust_pickle:
            raise
        state = read_pickled_state_dict(source)
    if num_classes is None:
        num_classes = infer_num_classes(state)
    model = create_model(model_name, num_classes=num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {source} do not fit {model_name!r}: {exc}") from exc
    return save_checkpoint(model, dst, class_names=class_names, converted_from=source.name)
