"""featurescope.compare on two resnet18s against the cost of tapping the same nodes alone.

The floor of any comparison is running both models and taking the nodes' outputs: this script
times exactly that (two FeatureTaps over the same batches, the same reduction, the outputs
dropped) and ``fs.compare`` over the same images, round-robin, and prints the ratio (the
issue's goal: at most 1.3) with the peak resident memory of each phase (``VmHWM``, reset
between phases through ``/proc/self/clear_refs``). Nodes: ``layer1`` … ``layer4`` and
``avgpool``; ``--reduce flatten`` gives ``layer1`` 200,704 features (the minibatch estimator),
``--reduce avgpool --estimator exact`` streams exact sums of at most 512 × 512.

Usage::

    python benchmarks/bench_compare.py                        # 2,000 images, as in the issue
    python benchmarks/bench_compare.py --images 128 --repeats 1 --threads 2
    python benchmarks/bench_compare.py --reduce avgpool --estimator exact
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import featurescope as fs

NODES = ["layer1", "layer2", "layer3", "layer4", "avgpool"]
_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def _cpu() -> str:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return f"{model} [{' '.join(f for f in _FLAGS if f in flags)}]"


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _measure(fn: Callable[[], Any]) -> tuple[float, float]:
    _reset_peak()
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began, _peak_rss_mib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="image side")
    parser.add_argument("--reduce", choices=("flatten", "avgpool"), default="flatten")
    parser.add_argument("--estimator", choices=("auto", "exact", "minibatch"), default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model_a = fs.create_model("resnet18").eval()
    torch.manual_seed(1)
    model_b = fs.create_model("resnet18").eval()
    images = TensorDataset(torch.randn(args.images, 3, args.size, args.size))
    reduce = {"flatten": lambda t: t.flatten(1), "avgpool": lambda t: t.mean((2, 3))}[args.reduce]
    taps = [fs.FeatureTap(m, NODES) for m in (model_a, model_b)]

    def tap_alone() -> None:
        with torch.inference_mode():
            for (batch,) in DataLoader(images, batch_size=args.batch_size):
                for tap in taps:
                    for value in tap(batch).values():
                        reduce(value if value.dim() > 2 else value[..., None, None])

    result: list[Any] = []

    def compare() -> None:
        result[:] = [
            fs.compare(model_a, model_b, images, nodes_a=NODES, nodes_b=NODES,
                       reduce=args.reduce, estimator=args.estimator, batch_size=args.batch_size,
                       progress=False)
        ]  # fmt: skip

    times: dict[str, list[float]] = {"tap": [], "compare": []}
    peaks: dict[str, list[float]] = {"tap": [], "compare": []}
    for _ in range(args.repeats):
        for name, fn in (("tap", tap_alone), ("compare", compare)):
            seconds, peak = _measure(fn)
            times[name].append(seconds)
            peaks[name].append(peak)

    print(f"processor: {_cpu()}; {os.cpu_count()} CPUs, torch threads {args.threads}")
    print(f"load average before/after: {os.getloadavg()}")
    print(f"torch {torch.__version__}; {args.images} images {args.size}px, batches of "
          f"{args.batch_size}, reduce={args.reduce}, nodes {NODES}")  # fmt: skip
    estimators = sorted({e for row in result[0].estimators for e in row})
    print(f"estimators used: {estimators}")
    tap_s, cmp_s = statistics.median(times["tap"]), statistics.median(times["compare"])
    print(f"{'':>26}{'median s':>10}{'img/s':>8}{'peak RSS MiB':>14}")
    for label, key, seconds in (
        ("tap both models (floor)", "tap", tap_s),
        ("fs.compare", "compare", cmp_s),
    ):
        print(f"{label:>26}{seconds:>10.2f}{args.images / seconds:>8.1f}{max(peaks[key]):>14.0f}")
    print(f"ratio compare / tap: {cmp_s / tap_s:.2f} (goal <= 1.3)")
    print("CKA matrix (rows: resnet18 seed 0, columns: seed 1):")
    print(result[0].to_csv(), end="")


if __name__ == "__main__":
    main()
