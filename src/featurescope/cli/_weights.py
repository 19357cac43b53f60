"""``featurescope weights fetch``: put zoo models' pretrained weights in their caches."""

from __future__ import annotations

import argparse
from typing import Any

from featurescope.cli._args import shown


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "weights",
        help="fetch pretrained weights into their caches, for use offline later",
        description=(
            "Manage the zoo's pretrained weights. They live where their library keeps them: "
            "torchvision's in torch's hub cache (TORCH_HOME/hub/checkpoints), timm's in Hugging "
            "Face's hub cache (HF_HOME/hub) or, for weights timm knows only by URL, in torch's. "
            "Any file torchvision, timm or featurescope already fetched is reused."
        ),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    f = actions.add_parser(
        "fetch",
        help="download the weights of the named models (nothing for those already cached)",
        description=(
            "Download the pretrained weights of each named model into its library's cache and "
            "print where each file is, one line per model: run it on a machine with network "
            "access, then copy the cache folders to an offline machine (or share TORCH_HOME and "
            "HF_HOME), where FEATURESCOPE_OFFLINE=1 makes sure nothing is downloaded. A file "
            "already cached is not fetched again; a hash that does not match, a transfer cut "
            "short or an HTTP error leaves nothing in the cache."
        ),
        epilog="example: featurescope weights fetch resnet18 convnext_tiny timm/resnet18",
    )
    f.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        help="zoo model names, as 'featurescope models' lists them",
    )
    f.add_argument(
        "--weights",
        default="DEFAULT",
        metavar="TAG",
        help=(
            "which pretrained weights: DEFAULT (each model's default, the default) or a tag, "
            "e.g. IMAGENET1K_V1 for resnet50 or a1_in1k for timm/resnet50"
        ),
    )
    f.set_defaults(func=_fetch)


def _fetch(args: argparse.Namespace) -> int:
    import featurescope as fs

    weights = True if args.weights == "DEFAULT" else args.weights
    # Every name is checked before anything is downloaded: a typo costs no transfer.
    for name in args.names:
        info = fs.zoo.model_spec(name)
        if info.weights is None:
            raise fs.FeaturescopeError(f"model {name!r} has no pretrained weights to fetch")
    for name in args.names:
        print(f"{shown(name)}: {shown(fs.zoo.fetch_weights(name, weights))}", flush=True)
    return 0
