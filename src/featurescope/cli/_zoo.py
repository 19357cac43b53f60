"""``featurescope models`` and ``featurescope convert``."""

from __future__ import annotations

import argparse
from typing import Any

from featurescope.cli._args import add_list_option, check_output, positive_int, shown
from featurescope.cli._build import structure_model


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the model zoo: names, input sizes, plugins (--details: stages too)",
        description=(
            "List the registered models (the study's AlexNets, every torchvision classification "
            "model, timm's as timm/<name> when timm is installed, and plugins') with their "
            "input size and the plugin that provides them. With --details each listed model is "
            "built (with random weights, and its pretrained weights' class count) to show its "
            "parameter count, embedding node and the output shape of each stage node (slow for "
            "many models: give a pattern)."
        ),
    )
    p.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'alexnet*' or 'resnet*'")
    p.add_argument(
        "--details", action="store_true", help="build each model: parameters and stage shapes"
    )
    p.set_defaults(func=_models)

    c = subparsers.add_parser(
        "convert",
        help="convert a .pt/.pth checkpoint (even a pickled model) to a safe .safetensors file",
        description=(
            "Convert a PyTorch checkpoint to featurescope's safetensors format. A state dict is "
            "read with torch.load(weights_only=True). A pickled whole model can run arbitrary "
            "code when loaded, so it is only read with --trust-pickle: use that only for files "
            "from a source you trust."
        ),
    )
    c.add_argument("src", help="the .pt/.pth file to convert")
    c.add_argument("dst", help="where to write the .safetensors checkpoint")
    c.add_argument("--model", required=True, help="zoo architecture, e.g. alexnet")
    c.add_argument("--num-classes", type=positive_int, help="default: read from the last layer")
    add_list_option(c, "--class-names", metavar="NAME", help="label names in index order")
    c.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling (runs code from the file); only for trusted files",
    )
    c.set_defaults(func=_convert)


def _models(args: argparse.Namespace) -> int:
    import featurescope as fs

    names = fs.list_models(args.pattern)
    if not names:
        raise fs.errors.UnknownNameError(_no_match(args.pattern))
    for name in names:
        info = fs.zoo.model_spec(name)
        size = list(info.input_size) if info.input_size else "?"
        print(f"{shown(name):<24} input {size}  [{shown(info.plugin)}]")
        if info.description:
            print(f"    {shown(info.description)}")
        if args.details:
            model = structure_model(name)
            meta = fs.model_metadata(model)
            assert meta is not None  # every zoo model carries it
            params = sum(p.numel() for p in model.parameters())
            print(f"    {params:,} params; embedding node {shown(str(meta.embedding_node))}")
            if meta.stage_nodes and meta.input_size:
                rows = fs.FeatureTap(model, list(meta.stage_nodes)).summary(print_fn=None)
                shapes = ", ".join(f"{r.alias} {list(r.output_shape[1:])}" for r in rows)
                print(f"    stages: {shown(shapes)}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import featurescope as fs

    check_output(args.dst, folder=False)
    out = fs.zoo.convert_checkpoint(
        args.src,
        args.dst,
        model_name=args.model,
        num_classes=args.num_classes,
        class_names=args.class_names,
        trust_pickle=args.trust_pickle,
    )
    print(f"wrote {shown(out)}")
    return 0


def _no_match(pattern: str) -> str:
    """Why ``pattern`` matched no model, and the pattern or the names that would."""
    import featurescope as fs
    from featurescope.errors import did_you_mean

    if not any(c in pattern for c in "*?["):  # a bare name: fnmatch matches it exactly
        for wider in (f"{pattern}*", f"*{pattern}*"):
            found = fs.list_models(wider)
            if found:
                shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")
                return (
                    f"no model is called {pattern!r}; did you mean the pattern '{wider}'? "
                    f"It matches {len(found)}: {shown}"
                )
    close = did_you_mean(pattern.strip("*?"), fs.list_models())
    return f"no model matches {pattern!r}.{close} 'featurescope models' lists them all"
