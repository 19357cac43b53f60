"""``--model`` and ``--weights``: how every command that builds a zoo model builds it.

``--weights`` takes ``DEFAULT`` (the model's pretrained weights where the zoo has any, else
random ones), a weights tag (``IMAGENET1K_V2``), ``none`` (random, on purpose) or a checkpoint
file; ``--checkpoint FILE`` is its older spelling. A model left with random weights is said so
once, on stderr: its feature maps and neighbours mean little.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurescope.cli._args import shown
from featurescope.errors import FeaturescopeError, WeightsUnavailableError

__all__ = ["Weights", "add_model_options", "build_model", "structure_model", "weights_choice"]

_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

_WEIGHTS_HELP = (
    "DEFAULT: the model's pretrained weights where the zoo has any (fetched into torch's or "
    "Hugging Face's cache), else random ones; a weights tag such as IMAGENET1K_V2; none: random "
    "weights; or a checkpoint FILE (a featurescope .safetensors, which names its model, or a "
    ".pt/.pth state dict). Default: DEFAULT"
)


@dataclass(frozen=True)
class Weights:
    """What ``--weights`` (or ``--checkpoint``) asked for.

    Attributes:
        kind: ``"default"``, ``"tag"``, ``"none"`` or ``"file"``.
        value: the tag or the file; ``None`` for the others.
    """

    kind: str
    value: str | None = None


def add_model_options(p: argparse.ArgumentParser, *, default: str | None = "alexnet") -> None:
    """``--model``, and ``--weights`` or its older spelling ``--checkpoint`` (not both)."""
    p.add_argument("--model", default=default, help=f"zoo model name (default: {default})")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", metavar="DEFAULT|TAG|none|FILE", help=_WEIGHTS_HELP)
    weights.add_argument("--checkpoint", metavar="FILE", help="the same as --weights FILE")


def weights_choice(args: argparse.Namespace) -> Weights:
    """Read ``--weights``/``--checkpoint``: an existing file, or a path-like name, is a file.

    Example:
        >>> weights_choice(argparse.Namespace(weights=None, checkpoint=None))
        Weights(kind='default', value=None)
        >>> weights_choice(argparse.Namespace(weights="IMAGENET1K_V2", checkpoint=None))
        Weights(kind='tag', value='IMAGENET1K_V2')
        >>> weights_choice(argparse.Namespace(weights="runs/best.safetensors", checkpoint=None))
        Weights(kind='file', value='runs/best.safetensors')
    """
    if args.checkpoint is not None:
        return Weights("file", args.checkpoint)
    value: str | None = args.weights
    if value is None or value.upper() == "DEFAULT":
        return Weights("default")
    if value.lower() == "none":
        return Weights("none")
    path = Path(value)
    if path.exists() or len(path.parts) > 1 or path.suffix.lower() in _CHECKPOINT_SUFFIXES:
        return Weights("file", value)
    return Weights("tag", value)


def _random_notice(name: str, weights: Weights, pretrained_tag: str | None) -> str:
    if weights.kind == "none":
        why = "--weights none"
        way_out = f"leave --weights out for its pretrained {pretrained_tag} weights"
        if pretrained_tag is None:
            way_out = "give a trained checkpoint with --weights FILE"
    else:
        why = "the zoo has no pretrained weights for it"
        way_out = (
            "give a trained checkpoint with --weights FILE, or a model with pretrained weights "
            "(e.g. --model resnet18)"
        )
    return (
        f"featurescope: {shown(name)} has random weights ({why}): its feature maps and neighbours "
        f"mean little; {way_out}"
    )


def build_model(args: argparse.Namespace) -> Any:
    """The model ``--model``/``--weights`` describe, in eval mode.

    Says once on stderr when its weights are random; a checkpoint's or pretrained weights that
    cannot be had are one line (a :class:`~featurescope.FeaturescopeError`).
    """
    import featurescope as fs

    weights = weights_choice(args)
    if weights.kind == "file":
        assert weights.value is not None
        recorded = fs.zoo.read_checkpoint_metadata(weights.value).get("model")
        return fs.zoo.load_checkpoint(weights.value, model_name=None if recorded else args.model)
    if args.model is None:
        raise FeaturescopeError("pass --model (or a --weights FILE that names its model)")
    info = fs.zoo.model_spec(args.model)
    if weights.kind == "tag" and info.weights is None:
        raise FeaturescopeError(
            f"{args.model} has no pretrained weights in the zoo, so no {weights.value!r}; use "
            "--weights none (random) or --weights FILE (a checkpoint)"
        )
    pretrained: bool | str = False  # --weights none, or DEFAULT where the zoo has none
    if weights.kind == "tag" and weights.value is not None:
        pretrained = weights.value
    elif weights.kind == "default" and info.weights is not None:
        pretrained = True
    try:
        model = fs.create_model(args.model, pretrained=pretrained).eval()
    except WeightsUnavailableError as exc:
        reason = " ".join(str(exc).split())  # one line, however the zoo worded it
        raise WeightsUnavailableError(
            f"{reason} (or run with --weights none for random weights)"
        ) from exc
    meta = fs.model_metadata(model)
    if meta is not None and meta.weights == "random":
        print(_random_notice(args.model, weights, info.weights), file=sys.stderr)
    return model


def structure_model(name: str) -> Any:
    """``name`` built as its pretrained weights would have it (their class count), with random
    weights: for commands that show a model's structure, which the weights do not change."""
    import featurescope as fs

    return fs.create_model(name, num_classes=fs.zoo.model_spec(name).pretrained_classes).eval()
