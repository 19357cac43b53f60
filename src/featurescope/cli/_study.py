"""``featurescope train``, ``maps``, ``index build``, ``index search`` and ``demo``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from featurescope.cli._args import (
    add_device_option,
    add_list_option,
    check_device,
    check_file,
    check_folder,
    check_output,
    int_at_least,
    positive_int,
    shown,
)
from featurescope.cli._build import add_model_options, build_model
from featurescope.errors import FeaturescopeError

_DATA_HELP = (
    "image folder with train/ (and val/, test/) holding one subfolder per class "
    "(default: the bundled synthetic dataset)"
)


def _lr_schedule(text: str) -> dict[int, float]:
    """Parse ``1:0.01,19:0.003`` (or a single rate ``0.001``) into ``{epoch: lr}``."""
    try:
        if ":" not in text:
            return {1: float(text)}
        pairs = (item.split(":") for item in text.split(","))
        return {int(epoch): float(lr) for epoch, lr in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FIRST_EPOCH:LR pairs like 1:0.01,19:0.003, got {text!r}"
        ) from None


def _run_options(p: argparse.ArgumentParser, *, out: str | None, out_help: str) -> None:
    p.add_argument("--out", default=out, help=out_help)
    add_device_option(p)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--quiet", action="store_true", help="no progress output")


def register(subparsers: Any) -> None:
    t = subparsers.add_parser(
        "train",
        help="train a zoo model on an image folder, with checkpoints and resume",
        description=(
            "Train a zoo model on DATA/train, validating on DATA/val (or 20%% of train held "
            "out, or DATA/test). Each epoch writes last.safetensors, best.safetensors, "
            "history.json and a resume state to --out; running the same command again resumes "
            "after the last finished epoch. Defaults come from --preset, and each option "
            "overrides its part of it."
        ),
    )
    t.add_argument("model", help="zoo model name, e.g. alexnet or alexnet_half")
    t.add_argument("--data", help=_DATA_HELP)
    t.add_argument("--preset", default="quick", help="quick (CPU minutes) or study (150 epochs)")
    t.add_argument("--epochs", type=positive_int, help="total epochs (default: the preset's)")
    t.add_argument("--batch-size", type=positive_int, help="default: the preset's first")
    t.add_argument(
        "--lr-schedule",
        type=_lr_schedule,
        metavar="E:LR,...",
        help="first epoch of each learning rate, e.g. the study's 1:0.01,19:0.003",
    )
    t.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), help="default: the preset's")
    _run_options(t, out=None, out_help="checkpoint folder (default: featurescope-runs/MODEL-bsB)")
    t.set_defaults(func=_train)

    m = subparsers.add_parser(
        "maps",
        help="draw an image's feature maps at chosen layers, per channel and summed",
        description=(
            "Preprocess IMAGE as the model expects, tap the given layers, and write for each "
            "layer LAYER_grid.png (every channel) and LAYER_sum.png (summed over channels)."
        ),
    )
    m.add_argument("image", help="an image file")
    add_model_options(m)
    add_list_option(
        m,
        "--layers",
        metavar="NODE",
        help="node or stage names (default: the model's stages; see 'featurescope nodes')",
    )
    m.add_argument(
        "--max-channels", type=positive_int, default=None, help="strongest channels shown"
    )
    m.add_argument("--out", default="featurescope-maps", help="output folder")
    add_device_option(m)
    m.set_defaults(func=_maps)

    index = subparsers.add_parser(
        "index",
        help="build an embedding index of a folder's images, or search one by image",
        description="Search by image: 'index build' embeds a folder, 'index search' queries it.",
    )
    sub = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    b = sub.add_parser(
        "build",
        help="embed every image of a folder and save an EmbeddingIndex",
        description=(
            "Embed every image under FOLDER (class subfolders, or a dataset root whose train/ "
            "holds them) with the model's last hidden layer and save the search to the folder "
            "OUT: the EmbeddingIndex with the images' labels and paths, the model (its weights "
            "unless the zoo name rebuilds them) and search.json. Python reads it with "
            "featurescope.ImageSearch.load(OUT)."
        ),
    )
    b.add_argument("folder", help="image folder (class subfolders) or dataset root with train/")
    add_model_options(b)
    b.add_argument("--node", help="embedding node (default: the model's last hidden layer)")
    b.add_argument(
        "--out", default="featurescope-index.fsindex", help="output folder (default: %(default)s)"
    )
    b.add_argument("--batch-size", type=positive_int, default=32)
    b.add_argument(
        "--metric",
        choices=("l2", "cosine", "ip"),
        default="l2",
        help="how images are compared: Euclidean distance (default), cosine similarity or inner "
        "product (the last two list the most similar first)",
    )
    add_device_option(b)
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_index_build)

    s = sub.add_parser(
        "search",
        help="find the images nearest to query images, and draw a montage",
        description=(
            "Embed each IMAGE with the model saved in INDEX, print its K nearest indexed "
            "images (distance, label, path) and write a montage figure. Indexed images that "
            "are missing (a moved folder: re-point it with --root) are named in one line and "
            "drawn as placeholders."
        ),
    )
    s.add_argument(
        "index", help="a folder written by 'featurescope index build' or ImageSearch.save"
    )
    s.add_argument("images", nargs="+", metavar="IMAGE", help="query image files")
    s.add_argument(
        "-k",
        type=positive_int,
        default=10,
        help="neighbours per query (default: 10; at most the index's)",
    )
    s.add_argument(
        "--root",
        metavar="DIR",
        help="where the indexed images are now, if their folder moved since 'index build'",
    )
    s.add_argument("--out", default="featurescope-search.png", help="montage figure")
    s.set_defaults(func=_index_search)

    d = subparsers.add_parser(
        "demo",
        help="reproduce the study's three experiments and write an HTML report",
        description=(
            "Train both AlexNet widths, compare their representations stage by stage (CKA), "
            "draw the trained net's feature maps stage by stage, show what its channels at "
            "conv1-conv3 respond to (top images, patches, deconvnet projections), search "
            "training images by image, and write figures, metrics.json, report.html and "
            "explorer.html to --out. The quick preset takes a few minutes on a CPU; --preset study runs the "
            "study's 150-epoch schedule (use a GPU). An interrupted demo resumes training; a "
            "finished one keeps only the best weights of the runs its report shows and says "
            "how much it wrote."
        ),
    )
    d.add_argument("--data", help=_DATA_HELP)
    d.add_argument("--preset", default="quick", help="quick (default) or study")
    _run_options(d, out="featurescope-demo", out_help="output folder (default: %(default)s)")
    d.set_defaults(func=_demo)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from featurescope.study import open_study_data, train_run
    from featurescope.train.presets import get_preset

    preset = get_preset(args.preset)
    overrides = {
        "epochs": args.epochs,
        "lr_schedule": args.lr_schedule,
        "optimizer": args.optimizer,
    }
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    device = check_device(args.device)
    splits = open_study_data(args.data, preset)
    batch_size = args.batch_size or preset.batch_sizes[0]
    out = Path(args.out or f"featurescope-runs/{args.model}-bs{batch_size}")
    run = train_run(
        splits,
        preset,
        args.model,
        batch_size,
        out=out,
        device=device,
        seed=args.seed,
        progress=not args.quiet,
    )
    history = run.history
    print(f"{'epoch':>5} {'train loss':>10} {'train acc':>9} {'val acc':>8}")
    for epoch in range(history.epochs):
        val = f"{history.val_acc[epoch]:8.3f}" if history.val_acc else f"{'-':>8}"
        print(
            f"{epoch + 1:>5} {history.train_loss[epoch]:>10.4f} "
            f"{history.train_acc[epoch]:>9.3f} {val}"
        )
    print(
        f"checkpoints in {shown(out)}: best.safetensors (epoch {history.best_epoch}), last.safetensors"
    )
    return 0


def _maps(args: argparse.Namespace) -> int:
    from featurescope.data import load_rgb
    from featurescope.study import draw_stage_maps, preprocess_image, stage_maps

    path = check_file(args.image, "image")
    try:
        image = load_rgb(path)
    except (OSError, ValueError) as exc:
        raise FeaturescopeError(f"cannot read image {args.image!r}: {exc}") from exc
    check_output(args.out, folder=True)
    device = check_device(args.device)
    model = build_model(args).to(device)
    maps = stage_maps(model, preprocess_image(model, image), args.layers)
    drawn = draw_stage_maps(maps, args.out, max_channels=args.max_channels)
    for layer, tensor in maps.items():
        files = drawn.get(layer)
        where = f"{files['grid']}, {files['sum']}" if files else "not a [C, H, W] map; not drawn"
        print(f"{shown(layer)}: {list(tensor.shape)} -> {shown(where)}")
    return 0


def _index_build(args: argparse.Namespace) -> int:
    import featurescope as fs

    check_folder(args.folder, "image folder")
    check_output(args.out, folder=True, replaceable="search.json")
    device = check_device(args.device)
    search = fs.ImageSearch.build(
        build_model(args),
        args.folder,
        node=args.node,
        batch_size=args.batch_size,
        device=device,
        progress=not args.quiet,
        metric=args.metric,
    )
    path = search.save(args.out)
    classes = len(search.class_names or [])
    print(
        f"indexed {len(search.index)} images ({search.index.dim}-d, {classes} classes) -> {shown(path)}"
    )
    return 0


def _index_search(args: argparse.Namespace) -> int:
    import sys

    import featurescope as fs
    from featurescope.study import weights_sentence

    search = fs.ImageSearch.load(args.index, root=args.root)
    if search.weights == "random":
        print(weights_sentence(search.weights), file=sys.stderr)
    missing = search.missing_summary()
    if missing:
        print(f"note: {shown(missing)}", file=sys.stderr)
    k = min(args.k, len(search.index))
    if k < args.k:
        print(
            f"note: -k {args.k} is more than the {len(search.index)} indexed images; showing {k}",
            file=sys.stderr,
        )
    result = search.search_images(list(args.images), k)
    classes = search.class_names or []
    names = {
        i: classes[lab] if 0 <= lab < len(classes) else str(lab)
        for i, lab in search.labels().items()
    }
    for query, dists, ids, paths in zip(
        args.images, result.distances.tolist(), result.ids.tolist(), result.metadata, strict=True
    ):
        print(f"{shown(query)}:")
        for rank, (dist, i, path) in enumerate(zip(dists, ids, paths, strict=True), start=1):
            print(f"  {rank:>3}  {dist:10.4f}  {shown(names.get(i, '?')):<12} {shown(path or '?')}")
    fs.visualizers.save(search.montage(list(args.images), k), args.out)
    print(f"montage -> {shown(args.out)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from featurescope.study.demo import run_demo

    device = check_device(args.device)
    run_demo(
        args.out,
        data=args.data,
        preset=args.preset,
        device=device,
        seed=args.seed,
        progress=not args.quiet,
    )
    return 0
