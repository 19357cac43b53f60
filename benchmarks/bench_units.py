"""top_activations against a plain extract of the same nodes, and projection times.

Measured side by side in one run on the study's ``alexnet`` (random weights, eval, CPU, one
thread, process CPU time, rounds run round-robin so that a shared machine's load spreads over
every contender):

1. **Throughput.** ``top_activations(model, data, nodes, k)`` (in memory, and saving its state
   to a folder as a resumable run does) against ``FeatureTap(model, nodes).extract(data)`` in
   memory over the same dataset and batches: the cost of ranking on the same machinery
   (goal: within 1.2x of the plain extract).
2. **Projection.** Median time per activation of ``project`` (one at a time: deconvnet,
   guided, plain gradient) and of ``projections`` (a batch of activations in one pass), and of
   ``receptive_fields`` over every node.

Usage::

    python benchmarks/bench_units.py            # a few minutes on 2 cores
    python benchmarks/bench_units.py --quick    # about a minute
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch.utils.data import TensorDataset

import featurescope as fs
from featurescope.tap import FeatureTap
from featurescope.units import projections, top_activations


def _cpu(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def _flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma")
                    have = " ".join(w for w in wanted if f" {w}" in line)
                    return f"{name}; {have}"
    except OSError:
        pass
    return "unknown"


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, batch, rounds = (32, 16, 3) if args.quick else (128, 32, 5)
    model = fs.create_model("alexnet").eval()
    data = TensorDataset(torch.randn(n, 3, 227, 227))
    nodes = ["conv1", "conv2", "conv3"]
    state = tempfile.mkdtemp()
    print(f"processor: {_flags()}; load average before: {_load()}")
    print(f"torch {torch.__version__}; 1 thread; {n} images, batch {batch}, {rounds} rounds")

    def extract() -> None:
        FeatureTap(model, nodes).extract(data, batch_size=batch, progress=False)

    def ranked() -> None:
        top_activations(model, data, nodes, k=9, batch_size=batch)

    def resumable() -> None:
        top_activations(model, data, nodes, k=9, batch_size=batch, out=state, overwrite=True)

    times: dict[str, list[float]] = {fn.__name__: [] for fn in (extract, ranked, resumable)}
    for r in range(rounds):
        order = [extract, ranked, resumable]
        for fn in order[r % 3 :] + order[: r % 3]:
            times[fn.__name__].append(_cpu(fn))
    plain = statistics.median(times["extract"])
    for name, label in (
        ("extract", "plain extract (in memory)"),
        ("ranked", "top_activations"),
        ("resumable", "top_activations, out="),
    ):
        t = statistics.median(times[name])
        print(f"{label:28s} {n / t:8.1f} images/s  {t / plain:6.3f}x extract  (goal <= 1.2x)")

    image = data.tensors[0][0]
    for method in ("deconvnet", "guided", "gradient"):
        t = [_cpu(lambda m=method: fs.units.project(model, image, "conv3", 5, (3, 3), method=m))
             for _ in range(rounds)]  # fmt: skip
        print(
            f"project {method:9s} one at a time  {1000 * statistics.median(t):8.1f} ms/activation"
        )
    many = data.tensors[0][:batch]
    channels = [c % 256 for c in range(batch)]
    positions = [(c % 6, (c * 5) % 6) for c in range(batch)]
    for node in nodes[::-1]:
        t = [_cpu(lambda nd=node: projections(model, many, nd, channels, positions))
             for _ in range(rounds)]  # fmt: skip
        per = 1000 * statistics.median(t) / batch
        print(f"projections {node}, batches of {batch}  {per:8.1f} ms/activation (deconvnet)")
    t = [_cpu(lambda: fs.tap.receptive_fields(model, None, (227, 227))) for _ in range(rounds)]
    print(f"receptive_fields (all nodes) {1000 * statistics.median(t):8.1f} ms")
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
