"""``featurescope serve``: a local web app over a saved image search."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from featurescope.cli._args import (
    add_device_option,
    add_list_option,
    check_device,
    check_folder,
    positive_int,
    shown,
)
from featurescope.errors import FeaturescopeError


def register(subparsers: Any) -> None:
    s = subparsers.add_parser(
        "serve",
        help="serve a saved image search as a local web app: drop in a photo, see its neighbours",
        description=(
            "Start a local web app over INDEX (a folder written by 'featurescope index build') "
            "and print its URL. In the browser, drop or choose a photo (or give a path in the "
            "gallery's folder) for its K nearest gallery images (exact), its Grad-CAM, its "
            "feature maps channel by channel, and the units it excites (with --units); browse "
            "the whole gallery on a 2-D map. It binds 127.0.0.1 (this machine only) unless "
            "--host says otherwise. Uploads stay in memory, limited in bytes and pixels. Needs "
            "pip install 'featurescope[serve]'."
        ),
    )
    s.add_argument("index", metavar="INDEX", help="a folder written by 'featurescope index build'")
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to bind (default: %(default)s; another address exposes the gallery "
        "to other machines, and is warned of)",
    )
    s.add_argument(
        "--port", type=int, default=8000, help="the port (default: %(default)s; 0: a free one)"
    )
    s.add_argument("-k", type=positive_int, default=10, help="neighbours shown (default: 10)")
    s.add_argument(
        "--root",
        metavar="DIR",
        help="where the indexed images are now, if their folder moved since 'index build'",
    )
    add_list_option(
        s,
        "--units",
        metavar="NODE",
        help="compute each channel's top gallery images at these nodes when starting (a pass "
        "over the gallery), to show the units a photo excites",
    )
    s.add_argument(
        "--projection",
        choices=("auto", "pca", "umap"),
        default="auto",
        help="the gallery's 2-D map (default: auto, UMAP when umap-learn is installed, else PCA)",
    )
    s.add_argument(
        "--max-upload-mb",
        type=positive_int,
        default=20,
        help="the largest photo accepted, in MiB (default: %(default)s)",
    )
    add_device_option(s)
    s.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from featurescope.serve import Limits, check_installed, serve
    from featurescope.study import ImageSearch, weights_sentence

    check_installed()  # before the index loads: a missing extra is said at once
    if not 0 <= args.port < 65536:
        raise FeaturescopeError(f"--port must be between 0 and 65535, got {args.port}")
    device = check_device(args.device)
    search = ImageSearch.load(check_folder(args.index, "INDEX"), root=args.root, device=device)
    print(weights_sentence(search.weights))
    missing = search.missing_summary()
    if missing:
        print(f"note: {shown(missing)}", file=sys.stderr)
    units = None
    if args.units:
        from featurescope.serve import GalleryImages
        from featurescope.units import top_activations

        print(f"computing units at {', '.join(args.units)} over {len(search.index)} images…")
        units = top_activations(search.model, GalleryImages(search), args.units, device=device)
    limits = Limits(max_bytes=args.max_upload_mb * 1024 * 1024)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a server stops: no failure
        serve(
            search,
            host=args.host,
            port=args.port,
            k=min(args.k, len(search.index)),
            units=units,
            projection=args.projection,
            limits=limits,
        )
    print("featurescope serve: stopped")
    return 0
