"""``featurescope explore``: the explorer page of a saved image search."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    e = subparsers.add_parser(
        "explore",
        help="write an offline HTML page to explore a saved image search",
        description=(
            "Write one HTML page that works offline from file:// (no server, no network): "
            "click a query image for its K nearest indexed images, browse its feature maps "
            "channel by channel, see its Grad-CAM, and a 2-D map (PCA, or UMAP when umap-learn "
            "is installed) of the indexed images. INDEX is a folder written by 'featurescope "
            "index build' or ImageSearch.save; 'featurescope demo' writes the same page for the "
            "study, with its training curves."
        ),
    )
    e.add_argument("--index", required=True, help="a folder written by 'featurescope index build'")
    e.add_argument(
        "--images",
        help="query images: a folder (subfolders named as the index's classes mark hits) or a "
        "file (default: some of the indexed images)",
    )
    e.add_argument("-k", type=int, default=10, help="neighbours per query (default: 10)")
    e.add_argument("--queries", type=int, default=40, help="query images at most (default: 40)")
    e.add_argument("--out", default="explorer.html", help="the page (default: %(default)s)")
    e.set_defaults(func=_explore)


def _explore(args: argparse.Namespace) -> int:
    from featurescope.study.explorer import explore_index

    page = explore_index(args.index, args.images, args.out, k=args.k, queries=args.queries)
    print(f"explorer -> {page} (open it in a browser; it needs no server)")
    return 0
