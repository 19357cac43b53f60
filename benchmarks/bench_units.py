"""top_activations against a plain FeatureTap pass over the same data, and projection times.

Measured side by side in one run on the study's ``alexnet`` (random weights, eval, CPU, one
thread, process CPU time, rounds run round-robin so that a shared machine's load spreads over
both contenders):

1. **Throughput.** ``top_activations(model, images, nodes, k)`` against ``FeatureTap(model,
   nodes)`` called over the same batches with nothing kept: the cost of ranking (goal: within
   1.2x of the plain pass).
2. **Projection.** Median time of one ``project`` (deconvnet, guided, plain gradient) and of
   ``receptive_fields`` over every node.

Usage::

    python benchmarks/bench_units.py            # about a minute on 2 cores
    python benchmarks/bench_units.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import featurescope as fs


def _cpu(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def _flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma")
                    return " ".join(w for w in wanted if f" {w}" in line)
    except OSError:
        pass
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, batch, rounds = (32, 16, 2) if args.quick else (128, 32, 5)
    model = fs.create_model("alexnet").eval()
    images = torch.randn(n, 3, 227, 227)
    nodes = ["conv1", "conv2", "conv3"]
    tap = fs.FeatureTap(model, nodes).eval()

    def plain() -> None:
        with torch.no_grad():
            for chunk in images.split(batch):
                tap(chunk)

    def ranked() -> None:
        fs.units.top_activations(model, images, nodes, k=9, batch_size=batch)

    ratios, plain_t, ranked_t = [], [], []
    for r in range(rounds):
        order = [plain, ranked] if r % 2 == 0 else [ranked, plain]
        times = {fn.__name__: _cpu(fn) for fn in order}
        plain_t.append(times["plain"])
        ranked_t.append(times["ranked"])
        ratios.append(times["ranked"] / times["plain"])
    print(f"cpu flags: {_flags()}; torch {torch.__version__}; 1 thread; {n} images, batch {batch}")
    print(
        f"plain tap pass     {n / statistics.median(plain_t):8.1f} images/s\n"
        f"top_activations    {n / statistics.median(ranked_t):8.1f} images/s\n"
        f"ratio (median of per-round ratios): {statistics.median(ratios):.3f}x  (goal <= 1.2x)"
    )
    image = images[0]
    for method in ("deconvnet", "guided", "gradient"):
        t = [_cpu(lambda m=method: fs.units.project(model, image, "conv3", 5, (3, 3), method=m))
             for _ in range(rounds)]  # fmt: skip
        print(f"project {method:9s}     {1000 * statistics.median(t):8.1f} ms per activation")
    t = [_cpu(lambda: fs.tap.receptive_fields(model, None, (227, 227))) for _ in range(rounds)]
    print(f"receptive_fields (all nodes) {1000 * statistics.median(t):8.1f} ms")


if __name__ == "__main__":
    main()
