"""Exact k-NN search: EmbeddingIndex against FAISS, torch.cdist+topk, scikit-learn, and sgemm.

Times, side by side in one run and on the same data, ``EmbeddingIndex.search``, faiss-cpu
``IndexFlatL2.search`` (when installed), ``torch.cdist`` + ``topk``, scikit-learn's brute-force
``NearestNeighbors`` (when installed) and ``torch.mm`` of the same shapes (the machine's float32
matrix-product rate, a ceiling for any method that computes every distance). Repeats are run
round-robin so that noise from other processes spreads over all methods; medians are reported.

Usage::

    python benchmarks/bench_index.py                 # the issue's sizes (minutes on 2 cores)
    python benchmarks/bench_index.py --quick         # a smoke run of a few seconds
    python benchmarks/bench_index.py --shapes 100000x512 --nq 2000 --k 5 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import featurescope as fs


def _timer(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _methods(
    x: torch.Tensor, q: torch.Tensor, k: int, skip: set[str]
) -> dict[str, Callable[[], Any]]:
    """Build each contender once (index construction is not timed) and return search calls."""
    methods: dict[str, Callable[[], Any]] = {}
    index = fs.EmbeddingIndex(x.shape[1])
    index.add(x)
    methods["EmbeddingIndex"] = lambda: index.search(q, k).ids
    if "faiss" not in skip:
        try:
            import faiss

            flat = faiss.IndexFlatL2(x.shape[1])
            flat.add(x.numpy())
            qn = q.numpy()
            methods["faiss IndexFlatL2"] = lambda: torch.from_numpy(flat.search(qn, k)[1])
        except ImportError:
            print("faiss not installed: skipped")
    if "cdist" not in skip:
        methods["cdist+topk"] = lambda: torch.cdist(q, x).topk(k, dim=1, largest=False).indices
    if "sklearn" not in skip:
        try:
            from sklearn.neighbors import NearestNeighbors

            nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(x.numpy())
            qn2 = q.numpy()
            methods["sklearn brute"] = lambda: torch.from_numpy(nn.kneighbors(qn2)[1])
        except ImportError:
            print("scikit-learn not installed: skipped")
    methods["torch.mm (sgemm)"] = lambda: torch.mm(q, x.T)
    return methods


def _exact_ids(x: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """Float64 brute force (ties to the smaller id): the reference for agreement counts."""
    x64 = x.double()
    chunk = max(1, 2**25 // (x.shape[0] * x.shape[1]))  # 256 MiB of float64 differences
    out = []
    for s in range(0, q.shape[0], chunk):
        d = ((q[s : s + chunk].double()[:, None, :] - x64[None]) ** 2).sum(-1)
        out.append(d.argsort(dim=1, stable=True)[:, :k])
    return torch.cat(out)


def run(nb: int, d: int, nq: int, k: int, repeats: int, skip: set[str], check: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(nb, d, generator=gen)
    q = torch.randn(nq, d, generator=gen)
    flops = 2.0 * nq * nb * d
    methods = _methods(x, q, k, skip)
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, Any] = {}
    for name, fn in methods.items():  # warm-up: thread pools, first-touch allocations
        _, results[name] = _timer(fn)
    for _ in range(repeats):
        for name, fn in methods.items():
            t, _ = _timer(fn)
            times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ours = med["EmbeddingIndex"]
    sgemm = med["torch.mm (sgemm)"]
    print(
        f"\n## nb={nb:,} d={d} nq={nq:,} k={k}  ({repeats} repeats, median; threads={torch.get_num_threads()})"
    )
    print("| method | median s | min s | max s | GFLOP/s | EmbeddingIndex speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in med.items():
        ts = times[name]
        print(
            f"| {name} | {m:.3f} | {min(ts):.3f} | {max(ts):.3f} | {flops / m / 1e9:.1f} | {m / ours:.2f}x |"
        )
    print(f"EmbeddingIndex at {sgemm / ours:.0%} of the sgemm rate of the same shapes")
    if check:
        ref = _exact_ids(x, q, k) if nb * nq * d <= 2e10 else None  # minutes beyond that
        for name in ("EmbeddingIndex", "faiss IndexFlatL2", "cdist+topk", "sklearn brute"):
            if name in results and ref is not None:
                same = (results[name].to(torch.int64) == ref).all(1).float().mean()
                print(f"  {name}: {same:.1%} of queries with exactly the float64 ids")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="50000x2048,200000x256", help="comma-separated NBxD")
    parser.add_argument("--nq", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repeats")
    parser.add_argument("--skip", default="", help="comma-separated: faiss,cdist,sklearn")
    parser.add_argument("--check", action="store_true", help="count queries matching float64 ids")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    nq, repeats = args.nq, args.repeats
    if args.quick:
        shapes = [(nb // 20, d) for nb, d in shapes]
        nq, repeats = min(nq, 200), 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    print(f"torch {torch.__version__}, numpy {np.__version__}, featurescope {fs.__version__}")
    for nb, d in shapes:
        run(nb, d, nq, args.k, repeats, skip, args.check)


if __name__ == "__main__":
    main()
