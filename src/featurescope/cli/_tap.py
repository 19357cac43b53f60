"""``featurescope summary MODEL`` and ``featurescope nodes MODEL``."""

from __future__ import annotations

import argparse
from typing import Any

from featurescope.cli._args import add_list_option, positive_int, shown
from featurescope.cli._build import structure_model


def register(subparsers: Any) -> None:
    s = subparsers.add_parser(
        "summary",
        help="print each node's op, output shape and parameters, like torchsummary",
        description=(
            "Run a zoo model once on zeros and print, for every graph node (or only --nodes), "
            "what it computes, its output shape and its parameters. A name may be a stage such as "
            "conv1, meaning the stage's last node. The model is built as its pretrained weights "
            "have it (their class count), with random weights: the structure is the same."
        ),
    )
    s.add_argument("model", help="zoo model name, e.g. alexnet (see 'featurescope models')")
    add_list_option(
        s,
        "--nodes",
        metavar="NODE",
        help="only these nodes (default: every graph node; every leaf module with --backend hooks)",
    )
    s.add_argument(
        "--input-size",
        nargs=3,
        type=positive_int,
        metavar=("C", "H", "W"),
        help="input size (default: the model's own)",
    )
    s.add_argument("--backend", choices=("auto", "fx", "hooks"), default="auto")
    s.set_defaults(func=_summary)

    n = subparsers.add_parser(
        "nodes",
        help="list a model's graph node names, as FeatureTap and torchvision accept them",
        description=(
            "List the node names of a zoo model in execution order (eval mode unless --train), "
            "as featurescope.get_graph_node_names returns them."
        ),
    )
    n.add_argument("model", help="zoo model name, e.g. alexnet")
    n.add_argument("--train", action="store_true", help="list the training-mode graph")
    n.set_defaults(func=_nodes)


def _summary(args: argparse.Namespace) -> int:
    import featurescope as fs

    model = structure_model(args.model)
    nodes = args.nodes or fs.tap.tappable_nodes(model, args.backend)
    tap = fs.FeatureTap(model, nodes, backend=args.backend)
    tap.summary(args.input_size)
    return 0


def _nodes(args: argparse.Namespace) -> int:
    import featurescope as fs

    train_nodes, eval_nodes = fs.get_graph_node_names(structure_model(args.model))
    for name in train_nodes if args.train else eval_nodes:
        print(shown(name))
    return 0
