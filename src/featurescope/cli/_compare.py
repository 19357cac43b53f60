"""``featurescope compare MODEL_A MODEL_B --data FOLDER``: linear CKA between their nodes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from featurescope.cli._args import (
    add_device_option,
    add_list_option,
    check_device,
    check_folder,
    int_at_least,
    positive_int,
)


def register(subparsers: Any) -> None:
    c = subparsers.add_parser(
        "compare",
        help="representation similarity (linear CKA) between the layers of two models",
        description=(
            "Run two zoo models over the images of FOLDER (preprocessed as MODEL_A expects; "
            "both get the same tensors) and write the linear CKA between every node of one and "
            "every node of the other to --out: similarity.png, matrix.csv, matrix.json and "
            "index.html. Cells of nodes with at most --max-exact-features features are exact "
            "over the whole folder; wider ones use the unbiased minibatch estimator (marked *). "
            "Running the same command again resumes an interrupted comparison."
        ),
    )
    c.add_argument("model_a", metavar="MODEL_A", help="zoo model name, e.g. alexnet")
    c.add_argument("model_b", metavar="MODEL_B", help="zoo model name, e.g. alexnet_half")
    c.add_argument(
        "--data",
        required=True,
        help="image folder (flat or class subfolders) or a dataset root whose train/ is one",
    )
    for side in ("a", "b"):
        upper = side.upper()
        weights = c.add_mutually_exclusive_group()
        weights.add_argument(
            f"--weights-{side}",
            metavar="DEFAULT|TAG|none|FILE",
            help=f"MODEL_{upper}'s weights, as 'maps --weights' takes them (default: the zoo's "
            "pretrained weights where it has any, else random, said once)",
        )
        weights.add_argument(
            f"--checkpoint-{side}", metavar="FILE", help=f"the same as --weights-{side} FILE"
        )
        add_list_option(
            c,
            f"--nodes-{side}",
            metavar="NODE",
            help=f"MODEL_{upper}'s nodes (default: its stage nodes; see 'featurescope nodes')",
        )
    c.add_argument("--reduce", choices=("flatten", "avgpool"), default="flatten")
    c.add_argument("--estimator", choices=("auto", "exact", "minibatch"), default="auto")
    c.add_argument("--max-exact-features", type=positive_int, default=4096, metavar="P")
    c.add_argument(
        "--batch-size", type=int_at_least(4), default=64, help="at least 4 (default: 64)"
    )
    add_device_option(c)
    c.add_argument("--out", default="featurescope-compare", help="output folder")
    c.add_argument("--overwrite", action="store_true", help="start afresh, do not resume")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_compare)


def data_root(folder: str) -> Path:
    """The image folder ``--data`` names: a dataset root's ``train/``, else the folder itself."""
    root = Path(folder)
    return root / "train" if (root / "train").is_dir() else root


def open_folder(folder: str, model: Any) -> Any:
    """``--data``'s images, read with ``model``'s preprocessing."""
    from featurescope.data import ImageFolder
    from featurescope.zoo import resolve_preprocessing

    return ImageFolder(data_root(folder), resolve_preprocessing(model).transform())


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    import featurescope as fs
    from featurescope.cli._build import build_model
    from featurescope.compare import write_comparison

    check_folder(args.data, "--data")
    device = check_device(args.device)
    sides = [
        argparse.Namespace(model=model, weights=weights, checkpoint=checkpoint)
        for model, weights, checkpoint in (
            (args.model_a, args.weights_a, args.checkpoint_a),
            (args.model_b, args.weights_b, args.checkpoint_b),
        )
    ]
    model_a = build_model(sides[0]).to(device)
    model_b = model_a if vars(sides[0]) == vars(sides[1]) else build_model(sides[1]).to(device)
    result = fs.compare(
        model_a,
        model_b,
        open_folder(args.data, model_a),
        nodes_a=args.nodes_a,
        nodes_b=args.nodes_b,
        reduce=args.reduce,
        estimator=args.estimator,
        max_exact_features=args.max_exact_features,
        batch_size=args.batch_size,
        device=device,
        out=Path(args.out) / "sums",
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    paths = write_comparison(result, args.out)
    print(result.to_csv(), end="")
    print(f"{result.num_images} images -> {paths['figure']}, {paths['csv']}, {paths['page']}")
    return 0
