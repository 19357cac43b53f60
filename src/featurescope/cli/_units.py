"""``featurescope units --model M --data FOLDER --nodes conv2,conv3``: what each channel sees."""

from __future__ import annotations

import argparse
from typing import Any

from featurescope.cli._args import (
    add_device_option,
    add_list_option,
    check_device,
    check_folder,
    check_output,
    positive_int,
    shown,
)
from featurescope.cli._build import add_model_options


def register(subparsers: Any) -> None:
    u = subparsers.add_parser(
        "units",
        help="what each channel responds to: its top images, patches and projections",
        description=(
            "Run a zoo model (or a checkpoint) over the images of FOLDER and find, for every "
            "channel of each node, the K images that excite it most (Zeiler & Fergus). Writes "
            "to --out: units.json (every channel's top activations, their images, positions "
            "and receptive-field boxes), each activation's patch and its projection back to "
            "pixels as PNG files, and one figure per node of its strongest channels. The "
            "ranking is saved as it goes; --resume takes up an interrupted run."
        ),
    )
    add_model_options(u)
    u.add_argument(
        "--data",
        required=True,
        help="image folder (flat or class subfolders) or a dataset root whose train/ is one",
    )
    add_list_option(
        u, "--nodes", metavar="NODE", help="the nodes whose channels to show (required)"
    )
    u.add_argument("-k", type=positive_int, default=9, help="top images per channel (default: 9)")
    u.add_argument(
        "--projection",
        choices=("deconvnet", "guided", "none"),
        default="deconvnet",
        help="how activations are projected back to pixels: Zeiler & Fergus's deconvnet, "
        "guided backpropagation, or none (patches only) (default: deconvnet)",
    )
    u.add_argument(
        "--reduce",
        choices=("max", "mean"),
        default="max",
        help="score an image by its strongest position or its mean (default: max)",
    )
    u.add_argument(
        "--figure-channels",
        type=positive_int,
        default=16,
        metavar="N",
        help="channels per node's figure, the strongest (default: 16)",
    )
    u.add_argument(
        "--file-channels",
        type=positive_int,
        metavar="N",
        help="write patch and projection files for the N strongest channels of each node only "
        "(units.json lists every channel; a projection costs a backward pass, and deep nodes' "
        "patches are large; default: every channel)",
    )
    u.add_argument("--batch-size", type=positive_int, default=32, help="default: 32")
    add_device_option(u)
    u.add_argument("--out", default="featurescope-units", help="output folder")
    u.add_argument(
        "--resume", action="store_true", help="take up the ranking an interrupted run left"
    )
    u.add_argument("--quiet", action="store_true", help="no progress bars")
    u.set_defaults(func=_units)


def _units(args: argparse.Namespace) -> int:
    from featurescope.cli._build import build_model
    from featurescope.cli._compare import data_root, open_folder
    from featurescope.errors import FeaturescopeError
    from featurescope.pages import write_units_page
    from featurescope.units import UNITS_FILE, top_activations, write_units

    if not args.nodes:
        raise FeaturescopeError(
            "name the nodes to show with --nodes, e.g. --nodes conv2,conv3 ('featurescope "
            "nodes MODEL' lists them)"
        )
    check_folder(args.data, "--data")
    out = check_output(args.out, folder=True)
    device = check_device(args.device)
    model = build_model(args).to(device)
    data = open_folder(args.data, model)
    projection = None if args.projection == "none" else args.projection
    units = write_units(
        model,
        data,
        args.nodes,
        out,
        k=args.k,
        projection=projection,
        reduce=args.reduce,
        figure_channels=args.figure_channels,
        file_channels=args.file_channels,
        batch_size=args.batch_size,
        device=device,
        resume=args.resume,
        progress=not args.quiet,
    )
    # The page reads the finished ranking back from out/state: no second pass over the data.
    top = top_activations(
        model, data, args.nodes, args.k, reduce=args.reduce, out=out / "state", progress=False
    )
    page = write_units_page(
        out / "units.html",
        model,
        data_root(args.data),
        args.nodes,
        k=args.k,
        reduce=args.reduce,
        projections=() if projection is None else (projection,),
        project_top=1,
        top=top,
        batch_size=args.batch_size,
    )
    figures = ", ".join(shown(out / n["figure"]) for n in units["nodes"] if n["figure"])
    print(f"{units['num_images']} images -> {shown(out / UNITS_FILE)}, {figures}")
    print(f"page -> {shown(page)}")
    return 0
