"""``featurescope models`` and ``featurescope convert``."""

from __future__ import annotations

import argparse
from typing import Any

import torch


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the model zoo with each model's input and stage shapes",
        description=(
            "List the registered models (builtin and plugin) with their input size and, for "
            "models built from named stages, the output shape of each stage."
        ),
    )
    p.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'alexnet*'")
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
    c.add_argument("--num-classes", type=int, help="default: read from the last layer")
    c.add_argument("--class-names", nargs="+", metavar="NAME", help="label names in index order")
    c.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow unpickling (runs code from the file); only for trusted files",
    )
    c.set_defaults(func=_convert)


def _stage_shapes(model: torch.nn.Module, stages: tuple[str, ...], size: tuple[int, ...]) -> str:
    shapes: dict[str, list[int]] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[stage].register_forward_hook(
            lambda _m, _i, out, stage=stage: shapes.__setitem__(stage, list(out.shape[1:]))
        )
        for stage in stages
        if stage in modules
    ]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *size))
    finally:
        for h in handles:
            h.remove()
    return ", ".join(f"{stage} {shapes[stage]}" for stage in stages if stage in shapes)


def _models(args: argparse.Namespace) -> int:
    import featurescope as fs

    for name in fs.list_models(args.pattern):
        info = fs.get_model_info(name)
        model = fs.create_model(name).eval()
        params = sum(p.numel() for p in model.parameters())
        size = info.input_size
        print(
            f"{name:<14} {params:>12,} params  input {list(size) if size else '?'}  [{info.plugin}]"
        )
        if info.description:
            print(f"    {info.description}")
        if size and info.stages:
            shapes = _stage_shapes(model, info.stages, size)
            if shapes:
                print(f"    stages: {shapes}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    import featurescope as fs

    out = fs.convert_checkpoint(
        args.src,
        args.dst,
        model_name=args.model,
        num_classes=args.num_classes,
        class_names=args.class_names,
        trust_pickle=args.trust_pickle,
    )
    print(f"wrote {out}")
    return 0
