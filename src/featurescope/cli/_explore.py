"""``featurescope explore``: the explorer page of a saved image search."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from featurescope.cli._args import positive_int, shown


def register(subparsers: Any) -> None:
    e = subparsers.add_parser(
        "explore",
        help="write an offline HTML page to explore a saved image search",
        description=(
            "Write one HTML page that works offline from file:// (no server, no network): "
            "click a query image for its K nearest indexed images (itself left out when it is "
            "one of them), browse its feature maps stage by stage and channel by channel, see "
            "its Grad-CAM (for a trained classifier), and a 2-D map (PCA, or UMAP when "
            "umap-learn is installed) of the indexed images. INDEX is a folder written by "
            "'featurescope index build' or ImageSearch.save; 'featurescope demo' writes the "
            "same page for the study, with its training curves."
        ),
    )
    e.add_argument("--index", required=True, help="a folder written by 'featurescope index build'")
    e.add_argument(
        "--images",
        help="query images: a folder (subfolders named as the index's classes mark hits) or a "
        "file (default: some of the indexed images)",
    )
    e.add_argument("-k", type=positive_int, default=10, help="neighbours per query (default: 10)")
    e.add_argument(
        "--queries", type=positive_int, default=40, help="query images at most (default: 40)"
    )
    e.add_argument(
        "--root",
        metavar="DIR",
        help="where the indexed images are now, if their folder moved since 'index build'",
    )
    e.add_argument(
        "--keep-self",
        action="store_true",
        help="keep a query that is itself indexed among its own neighbours (rank 1, distance 0)",
    )
    e.add_argument("--out", default="explorer.html", help="the page (default: %(default)s)")
    e.set_defaults(func=_explore)


def _explore(args: argparse.Namespace) -> int:
    from featurescope.study import weights_sentence
    from featurescope.study.explorer import explore_index, read_explorer_data

    page = explore_index(
        args.index,
        args.images,
        args.out,
        k=args.k,
        queries=args.queries,
        root=args.root,
        keep_self=args.keep_self,
    )
    data = read_explorer_data(page)
    print(weights_sentence(data["weights"]))
    for note in data["notes"].values():
        print(f"note: {shown(note)}", file=sys.stderr)
    print(f"explorer -> {shown(page)} (open it in a browser; it needs no server)")
    return 0
