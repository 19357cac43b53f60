"""FeatureTap against a plain forward and torchvision's create_feature_extractor, and extract().

Measured side by side in one run, on the study's ``alexnet`` (eval mode, inference mode, CPU):

1. **Forward.** Median time of ``model(x)``; of ``FeatureTap`` with the study's four stages
   (``conv1``, ``conv2``, ``conv3``, ``fc``); of ``FeatureTap`` with ``conv1`` only (the graph
   is pruned after it); of torchvision's ``create_feature_extractor`` for the same nodes; and of
   the hooks backend. Each ratio is against ``model(x)`` measured in the same round.
2. **Extraction.** Images per second of ``tap.extract`` (in memory, and streamed to disk) against
   a plain ``for x, _ in loader: model(x)`` over the same DataLoader.
3. **Real architectures.** torchvision's ``resnet50``, ``convnext_tiny``, ``vit_b_16`` and
   ``mobilenet_v3_large`` (random weights, 224 px): ``model(x)`` against a tap of four stages,
   a tap of *every* node of the eval graph (each returned, the in-place-overwritten ones copied),
   and torchvision's extractor of the same four stages.
4. **Memory.** Peak RSS and peak ``tracemalloc`` of an extraction to disk at two dataset sizes,
   each in a fresh process, with in-memory extraction alongside to show the measure can see
   growth. The dataset makes each image from its index, so it holds nothing itself.

Repeats run round-robin (the order rotating each round) so noise from other processes spreads
over all contenders; each ratio is the median over rounds of the ratio within a round, which
cancels the slow drift of a shared machine's load. By default torch runs one thread and the
clock is the process's CPU time: on a 2-core machine shared with other jobs, wall-clock times
of the same forward varied by a factor of two between rounds, while CPU time measures the work
done (``--clock wall --threads 2`` measures elapsed time instead). Usage::

    python benchmarks/bench_tap.py                   # batch 64, a few minutes on 2 cores
    python benchmarks/bench_tap.py --quick           # a smoke run
    python benchmarks/bench_tap.py --sections architectures --arch-batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

import featurescope as fs

STUDY_NODES = {"conv1": "output1", "conv2": "output2", "conv3": "output3", "fc": "output4"}
#: Four stages of each torchvision architecture measured: the usual feature-pyramid taps.
ARCHITECTURES: dict[str, list[str]] = {
    "resnet50": ["layer1", "layer2", "layer3", "layer4"],
    "convnext_tiny": ["features.1", "features.3", "features.5", "features.7"],
    "vit_b_16": [f"encoder.layers.encoder_layer_{i}" for i in (2, 5, 8, 11)],
    "mobilenet_v3_large": ["features.3", "features.6", "features.12", "features.16"],
}
SECTIONS = ("forward", "extract", "memory", "architectures")


class SyntheticImages(Dataset[tuple[torch.Tensor, int]]):
    """``n`` reproducible random 227×227 images, made on demand: memory does not grow with n."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, 227, 227, generator=g), i % 5


def _round_robin(
    contenders: dict[str, Callable[[], Any]], repeats: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Time each contender once per round; the order rotates from round to round."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for fn in contenders.values():  # warm up (first-call allocations, lazy inits)
        fn()
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = clock()
            contenders[name]()
            times[name].append(clock() - start)
    return times


def _ratios(times: dict[str, list[float]], base: str) -> dict[str, float]:
    """Median over rounds of each contender's time over ``base``'s time in the same round.

    On a shared machine the load drifts; a ratio taken within one round cancels most of it.
    """
    return {
        name: statistics.median(t / b for t, b in zip(ts, times[base], strict=True))
        for name, ts in times.items()
    }


def bench_forward(
    batch: int, repeats: int, clock: Callable[[], float]
) -> list[tuple[str, float, float]]:
    from torchvision.models.feature_extraction import create_feature_extractor

    model = fs.create_model("alexnet").eval()
    x = torch.randn(batch, 3, 227, 227)
    taps = {
        "FeatureTap 4 stages (fx)": fs.FeatureTap(model, STUDY_NODES, backend="fx"),
        "FeatureTap 4 stages (hooks)": fs.FeatureTap(model, list(STUDY_NODES), backend="hooks"),
        "torchvision 4 stages": create_feature_extractor(model, STUDY_NODES),
        "FeatureTap conv1 (fx)": fs.FeatureTap(model, ["conv1"], backend="fx"),
        "FeatureTap conv1 (hooks)": fs.FeatureTap(model, ["conv1"], backend="hooks"),
        "torchvision conv1": create_feature_extractor(model, ["conv1"]),
        "FeatureTap conv1.0 + conv2 (copies conv1.0)": fs.FeatureTap(model, ["conv1.0", "conv2"]),
    }
    contenders: dict[str, Callable[[], Any]] = {"model(x)": lambda: model(x)}
    contenders.update({name: (lambda t=t: t(x)) for name, t in taps.items()})
    with torch.inference_mode():
        times = _round_robin(contenders, repeats, clock)
    ratios = _ratios(times, "model(x)")
    return [(name, statistics.median(t), ratios[name]) for name, t in times.items()]


def bench_architectures(
    names: list[str], batch: int, repeats: int, clock: Callable[[], float]
) -> list[tuple[str, str, float, float, str]]:
    """Per model: ``(model, contender, median s, × model(x), note)``, measured side by side."""
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor
    from torchvision.models.feature_extraction import (
        get_graph_node_names as tv_get_graph_node_names,
    )

    rows = []
    for name in names:
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(batch, 3, 224, 224)
        stages = ARCHITECTURES[name]
        train_nodes, eval_nodes = fs.get_graph_node_names(model)
        every = [n for n in eval_nodes if n in set(train_nodes)]
        stage_tap = fs.FeatureTap(model, stages, backend="fx")
        every_tap = fs.FeatureTap(model, every, backend="fx")
        tv_tap = create_feature_extractor(model, stages)
        tv_train, tv_eval = tv_get_graph_node_names(model)
        tv_every = create_feature_extractor(model, [n for n in tv_eval if n in set(tv_train)])
        contenders: dict[str, Callable[[], Any]] = {
            "model(x)": lambda model=model, x=x: model(x),
            "FeatureTap 4 stages": lambda t=stage_tap, x=x: t(x),
            "FeatureTap every node": lambda t=every_tap, x=x: t(x),
            "torchvision 4 stages": lambda t=tv_tap, x=x: t(x),
            "torchvision every node": lambda t=tv_every, x=x: t(x),
        }
        notes = {"FeatureTap every node": f"{len(every)} nodes, {_kept(every_tap)}"}
        notes["FeatureTap 4 stages"] = _kept(stage_tap)
        with torch.inference_mode():
            times = _round_robin(contenders, repeats, clock)
        ratios = _ratios(times, "model(x)")
        rows += [
            (name, c, statistics.median(t), ratios[c], notes.get(c, "")) for c, t in times.items()
        ]
        del model, stage_tap, every_tap, tv_every, contenders
    return rows


def _kept(tap: fs.FeatureTap) -> str:
    """How many tapped nodes a later in-place op would overwrite, and how each is kept intact."""
    program = getattr(tap, "_fx", None)  # private: the eval program's own account, if there
    rewritten = len(program[False].rewritten) if program else 0
    kept = len(tap.copied)
    return f"{kept} kept from in-place writes ({kept - rewritten} copied)"


def bench_extract(
    n: int, batch: int, repeats: int, clock: Callable[[], float]
) -> list[tuple[str, float, float]]:
    model = fs.create_model("alexnet").eval()
    tap = fs.FeatureTap(model, STUDY_NODES)
    loader = DataLoader(SyntheticImages(n), batch_size=batch)
    out = tempfile.mkdtemp(prefix="bench_tap_")

    def plain() -> None:
        with torch.inference_mode():
            for x, _ in loader:
                model(x)

    contenders: dict[str, Callable[[], Any]] = {
        "plain loop of model(x)": plain,
        "tap.extract (memory)": lambda: tap.extract(loader, progress=False),
        "tap.extract (memory, avgpool)": lambda: tap.extract(
            loader, reduce="avgpool", progress=False
        ),
    }

    def fresh_disk() -> None:
        # Each repeat writes the whole extraction again rather than finding it complete.
        shutil.rmtree(out, ignore_errors=True)
        tap.extract(loader, out=out, progress=False)

    contenders["tap.extract (to disk)"] = fresh_disk
    times = _round_robin(contenders, repeats, clock)
    ratios = _ratios(times, "plain loop of model(x)")
    # Throughput ratio: the inverse of the time ratio.
    return [(name, n / statistics.median(t), 1 / ratios[name]) for name, t in times.items()]


def memory_child(n: int, mode: str) -> dict[str, float]:
    """One extraction of ``n`` images in this process; returns peak RSS and tracemalloc peak."""
    model = fs.create_model("alexnet").eval()
    # Raw conv1 maps (280 KB per image) so that holding them would show at once.
    tap = fs.FeatureTap(model, {"conv1": "conv1", "fc.4": "embedding"})
    loader = DataLoader(SyntheticImages(n), batch_size=32)
    tracemalloc.start()
    with tempfile.TemporaryDirectory() as out:
        result = tap.extract(loader, out=out if mode == "disk" else None, progress=False)
        rows = len(result)
        del result
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rows": rows, "peak_rss_mb": maxrss_kb / 1024, "tracemalloc_peak_mb": peak / 2**20}


def bench_memory(sizes: tuple[int, int]) -> list[tuple[str, int, dict[str, float]]]:
    rows = []
    for mode in ("disk", "memory"):
        for n in sizes:
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-child", str(n), mode],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            rows.append((mode, n, json.loads(proc.stdout.strip().splitlines()[-1])))
    return rows


def _table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"### {title}", "", line(header), sep, *(line(r) for r in rows), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--extract-images", type=int, default=128)
    parser.add_argument("--extract-repeats", type=int, default=3)
    parser.add_argument("--memory-sizes", type=int, nargs=2, default=(64, 256))
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: the process's CPU time (default; steady on a shared machine), or wall-clock",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--arch-batch", type=int, default=4, help="batch of the architectures")
    parser.add_argument("--arch-repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument(
        "--malloc-reuse",
        action="store_true",
        help="rerun under glibc malloc settings that keep freed memory for reuse "
        "(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), as jemalloc or tcmalloc would",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--memory-child", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.malloc_reuse and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc reads these at start-up only, so the process starts again with them.
        env = {
            **os.environ,
            "MALLOC_MMAP_THRESHOLD_": str(2**40),
            "MALLOC_TRIM_THRESHOLD_": str(2**40),
        }
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(int(args.memory_child[0]), args.memory_child[1])))
        return
    if args.quick:
        args.batch, args.repeats, args.extract_images, args.extract_repeats = 8, 1, 16, 1
        args.memory_sizes = (16, 48)
        args.arch_batch, args.arch_repeats = 1, 1

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, {args.clock} time")
    malloc = "freed memory kept for reuse" if "MALLOC_MMAP_THRESHOLD_" in os.environ else "default"
    print(f"CPU: {_cpu()}\nglibc malloc: {malloc}\n")
    if "forward" in args.sections:
        forward = bench_forward(args.batch, args.repeats, clock)
        print(
            _table(
                f"Forward, alexnet, batch {args.batch} ({args.repeats} rounds)",
                ("contender", "median s", "× model(x), median of rounds"),
                [(n, f"{t:.3f}", f"{r:.2f}") for n, t, r in forward],
            )
        )
        ratio = {name: r for name, _, r in forward}
        print("Targets:")
        print(f"  4 stages / model(x)       {ratio['FeatureTap 4 stages (fx)']:.2f}  (<= 1.05)")
        print(f"  conv1 only / model(x)     {ratio['FeatureTap conv1 (fx)']:.2f}  (<= 0.50)\n")
    if "architectures" in args.sections:
        arch = bench_architectures(args.models, args.arch_batch, args.arch_repeats, clock)
        print(
            _table(
                f"Forward, torchvision architectures, 224 px, batch {args.arch_batch} "
                f"({args.arch_repeats} rounds)",
                ("model", "contender", "median s", "× model(x), median of rounds", "note"),
                [(m, c, f"{t:.3f}", f"{r:.2f}", note) for m, c, t, r, note in arch],
            )
        )
        print("Targets:")
        for m, c, _, r, _ in arch:
            goal = {"FeatureTap 4 stages": 1.05, "FeatureTap every node": 1.3}.get(c)
            if goal is not None:
                print(f"  {m:20s} {c:22s} {r:.2f}  (<= {goal})")
        print()
    if "extract" in args.sections:
        extract = bench_extract(args.extract_images, args.batch, args.extract_repeats, clock)
        print(
            _table(
                f"Extraction of {args.extract_images} images, batch {args.batch} "
                f"({args.extract_repeats} rounds)",
                ("contender", "median images/s", "× plain loop, median of rounds"),
                [(n, f"{ips:.1f}", f"{r:.2f}") for n, ips, r in extract],
            )
        )
        print("Targets:")
        print(f"  extract / plain loop      {extract[1][2]:.2f}  (>= 0.90, in memory)")
        print(f"  extract to disk / plain   {extract[3][2]:.2f}  (>= 0.90)\n")
    if "memory" in args.sections:
        memory = bench_memory(tuple(args.memory_sizes))
        print(
            _table(
                "Peak memory of extract (conv1 maps + fc.4), fresh process each",
                ("where", "images", "peak RSS MB", "tracemalloc peak MB"),
                [
                    (mode, str(n), f"{m['peak_rss_mb']:.0f}", f"{m['tracemalloc_peak_mb']:.1f}")
                    for mode, n, m in memory
                ],
            )
        )
        disk = {n: m for mode, n, m in memory if mode == "disk"}
        small, large = args.memory_sizes
        print(
            f"Target: disk peak RSS {large} vs {small} images  "
            f"{disk[large]['peak_rss_mb'] / disk[small]['peak_rss_mb']:.2f}  (~1.00: no growth)"
        )


def _cpu() -> str:
    """The processor's model and its vector flags, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown"
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "?"
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []
    )
    vector = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return f"{model}, {os.cpu_count()} cores, {' '.join(vector)}"


if __name__ == "__main__":
    main()
