"""EmbeddingIndex.search of this checkout against an earlier commit's, interleaved in one process.

Issue 24 asks that the searcher rewrite keep search speed within 5 % of the kernel it
replaced "on every shape (same machine, same run)". Two separate runs of ``bench_index.py``
cannot show 5 %: on a shared machine the load moves more than that between runs. This script
exports the package of ``--ref`` (default ``4788842``, the last commit of the old kernel) with
``git archive`` into a temporary folder under another name (``featurescope_ref``), imports it
beside the checkout's ``featurescope``, builds both indexes from the same data and searches
them alternately, flipping the order every round, so that noise falls on both alike. Per shape
it times the full search (nq = 1,000), latency at nq = 1 and 16 (20 and 5 calls per sample),
and 1 % and 50 % filters; it prints per line the medians, their ratio and the median of the
per-round ratios (the steadier figure under load), checks that both return the same ids and
distances, and names the product backend each one ran.

Usage (from the repository root, which must be a git checkout holding ``--ref``)::

    python benchmarks/bench_index_versions.py                          # the four shapes
    python benchmarks/bench_index_versions.py --shapes 200000x256 --repeats 9
    python benchmarks/bench_index_versions.py --quick                  # a smoke run
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_index import header  # the processor, SIMD flags, BLAS and load banner

_ROOT = Path(__file__).resolve().parent.parent


def export(ref: str, into: Path, name: str = "featurescope_ref") -> Any:
    """``src/featurescope`` at ``ref``, importable as ``name`` (absolute imports renamed)."""
    blob = subprocess.run(
        ["git", "-C", str(_ROOT), "archive", "--format=tar", ref, "src/featurescope"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    package = into / name
    (into / "src" / "featurescope").rename(package)
    word = re.compile(r"\bfeaturescope(?=[.\s])")
    for path in package.rglob("*.py"):
        text = path.read_text()
        path.write_text(word.sub(name, text))
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, per_call: int
) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up: thread pools, first-touch pages, backend races
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for round_ in range(repeats):
        for name in order if round_ % 2 == 0 else order[::-1]:
            times[name].append(_timed(fns[name]) / per_call)
    return times


def _line(shape: str, what: str, times: dict[str, list[float]], worst: list[Any]) -> None:
    ref, new = times["ref"], times["this"]
    ratio = statistics.median(new) / statistics.median(ref)
    per_round = statistics.median(b / a for a, b in zip(ref, new, strict=True))
    mark = "" if max(ratio, per_round) <= 1.05 else " **over 5 %**"
    worst.append((max(ratio, per_round), shape, what))
    print(f"| {shape} | {what} | {statistics.median(ref):.4f} | {statistics.median(new):.4f} "
          f"| {ratio:.3f} | {per_round:.3f}{mark} |")  # fmt: skip


def _backend(package: Any, result: Any, d: int) -> str:
    """The product backend a search ran (older results do not say: ask its race's record)."""
    if hasattr(result, "backend"):
        return str(result.backend)
    search = importlib.import_module(f"{package.__name__}.index.search")
    return str(search.chosen_backends().get(d, "?"))


def run_shape(
    old: Any, new: Any, nb: int, d: int, nq: int, k: int, repeats: int, worst: list[Any]
) -> None:
    gen = torch.Generator().manual_seed(0)
    x, q = torch.randn(nb, d, generator=gen), torch.randn(nq, d, generator=gen)
    indexes = {"ref": old.EmbeddingIndex(d), "this": new.EmbeddingIndex(d)}
    for index in indexes.values():
        index.add(x)
    shape = f"{nb:,} × {d:,}"
    a, b = (indexes[n].search(q, k) for n in ("ref", "this"))
    same = torch.equal(a.ids, b.ids) and torch.allclose(a.distances, b.distances)
    print(
        f"| {shape} | backend ref / this: {_backend(old, a, d)} / {_backend(new, b, d)}; "
        f"same results: {same} "
        "| | | | |"
    )
    search = {n: (lambda i=i: i.search(q, k)) for n, i in indexes.items()}
    _line(shape, "search", _interleaved(search, repeats, 1), worst)
    for sub, calls in ((1, 20), (16, 5)):
        qs = q[:sub]
        fns = {
            n: (lambda i=i, qs=qs, c=calls: [i.search(qs, k) for _ in range(c)])
            for n, i in indexes.items()
        }
        _line(shape, f"nq = {sub} (per call)", _interleaved(fns, max(repeats, 5), calls), worst)
    masks = np.random.default_rng(1)
    for share in (0.01, 0.5):
        mask = torch.from_numpy(masks.random(nb) < share)
        fns = {n: (lambda i=i, m=mask: i.search(q, k, where=m)) for n, i in indexes.items()}
        _line(shape, f"filtered {share:.0%}", _interleaved(fns, repeats, 1), worst)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ref", default="4788842", help="git commit of the kernel to beat")
    parser.add_argument(
        "--shapes", default="50000x2048,200000x256,1000000x64,20000x4096", help="NBxD,..."
    )
    parser.add_argument("--nq", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import featurescope as new

    header(args.threads)
    shapes = "20000x256,50000x64" if args.quick else args.shapes
    repeats = 3 if args.quick else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        old = export(args.ref, Path(tmp))
        print(f"ref {args.ref} ({old.__file__}) against this checkout ({new.__file__}); "
              f"nq={args.nq}, k={args.k}, {repeats} rounds, order flipped each round\n")  # fmt: skip
        print("| nb × d | what | ref median s | this median s | this / ref "
              "| median of round ratios |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|")
        worst: list[Any] = []
        for spec in shapes.split(","):
            nb, d = (int(v) for v in spec.lower().split("x"))
            run_shape(old, new, nb, d, args.nq, args.k, repeats, worst)
    with_load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    over = [w for w in worst if w[0] > 1.05]
    print(f"\nload average at end: {with_load}")
    print(f"lines over 5 % (by the larger of the two ratios): {len(over)} of {len(worst)}")
    for ratio, shape, what in sorted(over, reverse=True):
        print(f"  {shape} {what}: {ratio:.3f}")


if __name__ == "__main__":
    main()
