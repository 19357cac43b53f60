"""Exact k-NN search: EmbeddingIndex against faiss-cpu IndexFlatL2 and the machine's sgemm rate.

Times, side by side in one run, on the same data and with the same thread count
(``torch.set_num_threads`` = ``faiss.omp_set_num_threads``): ``EmbeddingIndex.search``,
faiss-cpu ``IndexFlatL2.search``, and the float32 matrix product of the same shapes through
torch (MKL or OpenBLAS) and numpy (its bundled OpenBLAS); the faster product is the ceiling of
any float32 method that computes every distance. The bfloat16 product of the same shapes is
timed too: the ceiling of the index's ``bfloat16`` backend, where the processor makes it
faster. Repeats run round-robin so that noise from other processes falls on every method alike;
medians are reported. ``add`` is timed side by side with FAISS's ``add`` (fresh indexes), and a
closing table puts add and search of every shape side by side with the backend that ran.

Per shape it also prints the time breakdown of one search (product, selection, re-rank,
summed over worker threads), latency at nq = 1 and 16, filtered search at 1 % and 50 %
selectivity (against FAISS's ``IDSelectorBitmap``), and the same gallery memory-mapped from
a file (``load(mmap=True)``) against it in RAM. The header names the processor, its SIMD
flags, the BLAS libraries loaded and the backend the index chose.

Usage::

    python benchmarks/bench_index.py                      # the issue's four shapes
    python benchmarks/bench_index.py --quick              # a smoke run of seconds
    python benchmarks/bench_index.py --shapes 100000x512 --nq 2000 --k 5 --repeats 5
    python benchmarks/bench_index.py --threads 2 --check  # also count exact-id queries
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import featurescope as fs
from featurescope.index._search._backends import chosen_backends
from featurescope.index._search._openblas import openblas_sgemm
from featurescope.index._search._profile import time_breakdown

_PHASES = ("product", "selection", "re-rank", "second pass")
_SIMD = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
         "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")  # fmt: skip


def _cpu() -> tuple[str, list[str]]:
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
    return model, [f for f in _SIMD if f in flags]


def header(threads: int) -> None:
    model, flags = _cpu()
    print(f"CPU: {model}; {os.cpu_count()} logical cores; SIMD: {' '.join(flags) or '?'}")
    with contextlib.suppress(OSError):
        print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), numpy "
          f"{np.__version__}, featurescope {fs.__version__}")  # fmt: skip
    blas = "MKL" if torch.backends.mkl.is_available() else "its own BLAS (OpenBLAS?)"
    onednn = "oneDNN" if torch.backends.mkldnn.is_available() else "no oneDNN"
    print(f"torch matrix product: {blas} (float32), {onednn} (bfloat16); "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}")  # fmt: skip
    try:
        import threadpoolctl

        for info in threadpoolctl.threadpool_info():
            print(f"  loaded: {info['internal_api']} {info.get('version') or ''} "
                  f"({info['prefix']}, {info['num_threads']} threads, "
                  f"{info.get('architecture') or info.get('threading_layer') or ''})")  # fmt: skip
    except ImportError:
        print("  threadpoolctl missing: the loaded BLAS libraries are not listed")
    single = "yes" if openblas_sgemm() is not None else "no (backend 'numpy' left out of the race)"
    print(f"OpenBLAS product single-threaded per worker (batch of one): {single}")
    try:
        import faiss

        print(f"faiss {faiss.__version__} ({faiss.get_compile_options().strip()}), "
              f"omp threads {faiss.omp_get_max_threads()}")  # fmt: skip
    except ImportError:
        print("faiss not installed: its columns are skipped")
    print(f"threads: torch {torch.get_num_threads()} (requested {threads})")


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _round_robin(
    methods: dict[str, Callable[[], Any]], repeats: int, warm: bool = True
) -> dict[str, list[float]]:
    for fn in methods.values() if warm else ():  # warm-up: thread pools, first-touch pages
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            times[name].append(_timed(fn))
    return times


def _faiss_flat(x: torch.Tensor) -> Any:
    try:
        import faiss
    except ImportError:
        return None
    flat = faiss.IndexFlatL2(x.shape[1])
    flat.add(x.numpy())
    return flat


def _table(times: dict[str, list[float]], flops: float, ours: str) -> dict[str, float]:
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print("| method | median s | min s | max s | GFLOP/s | EmbeddingIndex speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in med.items():
        ts = times[name]
        print(f"| {name} | {m:.4f} | {min(ts):.4f} | {max(ts):.4f} | "
              f"{flops / m / 1e9:.1f} | {m / med[ours]:.2f}x |")  # fmt: skip
    return med


def _latency(index: fs.EmbeddingIndex, flat: Any, q: torch.Tensor, k: int, repeats: int) -> None:
    for nq in (1, 16):
        calls = max(3, int(20 / nq))
        sub = q[:nq]
        methods: dict[str, Callable[[], Any]] = {
            "EmbeddingIndex": lambda sub=sub, c=calls: [index.search(sub, k) for _ in range(c)]
        }
        if flat is not None:
            qn = sub.numpy()
            methods["faiss IndexFlatL2"] = lambda qn=qn, c=calls: [
                flat.search(qn, k) for _ in range(c)
            ]
        med = {n: statistics.median(t) / calls for n, t in _round_robin(methods, repeats).items()}
        line = ", ".join(f"{n} {v * 1e3:.2f} ms" for n, v in med.items())
        ratio = med.get("faiss IndexFlatL2", float("nan")) / med["EmbeddingIndex"]
        print(f"latency nq={nq}: {line}; FAISS / EmbeddingIndex = {ratio:.2f}x")


def _filtered(
    index: fs.EmbeddingIndex, flat: Any, q: torch.Tensor, k: int, repeats: int, full: float
) -> None:
    gen = np.random.default_rng(1)
    n = len(index)
    for share in (0.01, 0.5):
        mask = torch.from_numpy(gen.random(n) < share)
        methods: dict[str, Callable[[], Any]] = {
            "EmbeddingIndex": lambda mask=mask: index.search(q, k, where=mask)
        }
        if flat is not None:
            import faiss

            bits = np.packbits(mask.numpy(), bitorder="little")
            sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
            params = faiss.SearchParameters(sel=sel)
            qn = q.numpy()
            methods["faiss IDSelectorBitmap"] = lambda p=params, b=bits, qn=qn: flat.search(
                qn, k, params=p
            )
        # FAISS's selector path computes distances one vector at a time (no BLAS): slow enough
        # at 50 % that one timed round, after the unfiltered warm-up, has to do; the index is
        # warmed up on the filtered search itself either way.
        if share > 0.1:
            methods["EmbeddingIndex"]()
        rounds = _round_robin(methods, 1 if share > 0.1 else repeats, warm=share <= 0.1)
        med = {name: statistics.median(t) for name, t in rounds.items()}
        ours = med["EmbeddingIndex"]
        line = ", ".join(f"{name} {v:.4f} s" for name, v in med.items())
        faiss_ratio = med.get("faiss IDSelectorBitmap", float("nan")) / ours
        print(f"filtered {share:.0%}: {line}; FAISS / EmbeddingIndex = {faiss_ratio:.2f}x; "
              f"unfiltered / filtered = {full / ours:.2f}x")  # fmt: skip


def _mapped(index: fs.EmbeddingIndex, q: torch.Tensor, k: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = index.save(Path(tmp) / "gallery.safetensors")
        start = time.perf_counter()
        mapped = fs.EmbeddingIndex.load(path, mmap=True)
        opened = time.perf_counter() - start
        times = _round_robin(
            {"in RAM": lambda: index.search(q, k), "mmap": lambda: mapped.search(q, k)}, repeats
        )
        med = {name: statistics.median(t) for name, t in times.items()}
        same = torch.equal(mapped.search(q[:64], k).ids, index.search(q[:64], k).ids)
        print(f"memory-mapped gallery (page cache warm; opened in {opened:.2f} s): in RAM "
              f"{med['in RAM']:.4f} s, mmap {med['mmap']:.4f} s, throughput "
              f"{med['in RAM'] / med['mmap']:.0%} of in-RAM; same ids: {same}")  # fmt: skip


def _exact_ids(x: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """Float64 brute force (ties to the smaller id): the reference for agreement counts."""
    x64 = x.double()
    chunk = max(1, 2**25 // (x.shape[0] * x.shape[1]))
    out = []
    for s in range(0, q.shape[0], chunk):
        d = ((q[s : s + chunk].double()[:, None, :] - x64[None]) ** 2).sum(-1)
        out.append(d.argsort(dim=1, stable=True)[:, :k])
    return torch.cat(out)


def _adding(
    x: torch.Tensor, q: torch.Tensor, k: int, repeats: int, no_faiss: bool
) -> dict[str, float]:
    """``add`` side by side with FAISS's, and the first search after it (which computes the
    norms ``add`` leaves for later)."""
    d = x.shape[1]
    methods: dict[str, Callable[[], Any]] = {
        "EmbeddingIndex.add": lambda: fs.EmbeddingIndex(d).add(x)
    }
    if not no_faiss and _faiss_flat(x[:1]) is not None:
        import faiss

        xn = x.numpy()
        methods["faiss IndexFlatL2.add"] = lambda: faiss.IndexFlatL2(d).add(xn)

    def add_then_search() -> None:
        index = fs.EmbeddingIndex(d)
        index.add(x)
        index.search(q[:1], k)

    methods["EmbeddingIndex.add + first search (1 query)"] = add_then_search
    times = _round_robin(methods, repeats, warm=False)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print("\n| add (fresh index each time) | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m:.4f} | {min(times[name]):.4f} | {max(times[name]):.4f} |")
    if "faiss IndexFlatL2.add" in med:
        ratio = med["EmbeddingIndex.add"] / med["faiss IndexFlatL2.add"]
        print(f"EmbeddingIndex.add / FAISS add: {ratio:.2f}x")
    return med


#: One row per shape for the closing table: add and search side by side, and the backend.
_SUMMARY: list[str] = []


def _summarise(nb: int, d: int, add: dict[str, float], search: dict[str, float], ran: str) -> None:
    nan = float("nan")
    ours_add, faiss_add = add["EmbeddingIndex.add"], add.get("faiss IndexFlatL2.add", nan)
    ours, faiss = search["EmbeddingIndex"], search.get("faiss IndexFlatL2", nan)
    _SUMMARY.append(
        f"| {nb:,} × {d} | {ours_add:.3f} | {faiss_add:.3f} | {ours_add / faiss_add:.2f}x | "
        f"{ours:.3f} | {faiss:.3f} | {faiss / ours:.2f}x | {ran} |"
    )


def _print_summary() -> None:
    print("\n## Summary: add and search side by side (medians, seconds)\n")
    print("| nb × d | add | FAISS add | add / FAISS | search | FAISS search | FAISS / search "
          "| backend that ran |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(_SUMMARY))


def run(nb: int, d: int, nq: int, k: int, repeats: int, args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(nb, d, generator=gen)
    q = torch.randn(nq, d, generator=gen)
    flops = 2.0 * nq * nb * d
    index = fs.EmbeddingIndex(d)
    index.add(x)
    flat = None if args.no_faiss else _faiss_flat(x)
    qn, xn = q.numpy(), x.numpy()
    mm_out = np.empty((nq, nb), dtype=np.float32)
    methods: dict[str, Callable[[], Any]] = {"EmbeddingIndex": lambda: index.search(q, k)}
    if flat is not None:
        methods["faiss IndexFlatL2"] = lambda: flat.search(qn, k)
    methods["torch.mm (sgemm)"] = lambda: torch.mm(q, x.T)
    methods["numpy matmul (sgemm)"] = lambda: np.matmul(qn, xn.T, out=mm_out)
    qb, xb = q.bfloat16(), x.bfloat16()
    methods["torch.mm (bfloat16)"] = lambda: torch.mm(qb, xb.T)
    print(f"\n## nb={nb:,} d={d} nq={nq:,} k={k} ({repeats} repeats round-robin, median; "
          f"threads={torch.get_num_threads()})\n")  # fmt: skip
    times = _round_robin(methods, repeats)
    med = _table(times, flops, "EmbeddingIndex")
    ours = med["EmbeddingIndex"]
    best_mm = min(med["torch.mm (sgemm)"], med["numpy matmul (sgemm)"])
    ran = index.search(q, k).backend
    print(f"\nEmbeddingIndex at {best_mm / ours:.0%} of the best sgemm rate of the same shapes "
          f"({med['torch.mm (bfloat16)'] / ours:.0%} of the bfloat16 product's); product "
          f"backend that ran: {ran} (race: {chosen_backends().get(d, 'not run')})")  # fmt: skip
    if flat is not None:
        print(f"EmbeddingIndex / FAISS: {med['faiss IndexFlatL2'] / ours:.2f}x")
    _summarise(nb, d, _adding(x, q, k, repeats, args.no_faiss), med, ran)
    with time_breakdown() as parts:
        elapsed = _timed(lambda: index.search(q, k))
    # The breakdown also counts rows and bytes; only the phases are times.
    times_only = {n: v for n, v in parts.items() if n in _PHASES}
    total = sum(times_only.values()) or 1.0
    shares = ", ".join(f"{name} {v:.3f} s ({v / total:.0%})" for name, v in times_only.items())
    print(f"breakdown (thread-seconds, one search of {elapsed:.3f} s): {shares}")
    _latency(index, flat, q, k, max(3, repeats))
    _filtered(index, flat, q, k, repeats, ours)
    if not args.no_mmap:
        _mapped(index, q, k, repeats)
    if args.check and nb * nq * d <= 2e10:
        ref = _exact_ids(x, q, k)
        got = {"EmbeddingIndex": index.search(q, k).ids}
        if flat is not None:
            got["faiss IndexFlatL2"] = torch.from_numpy(flat.search(qn, k)[1])
        for name, ids in got.items():
            same = (ids.to(torch.int64) == ref).all(1).float().mean()
            print(f"  {name}: {same:.1%} of queries with exactly the float64 ids")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shapes", default="50000x2048,200000x256,1000000x64,20000x4096", help="NBxD,..."
    )
    parser.add_argument("--nq", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repeats")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--no-mmap", action="store_true")
    parser.add_argument("--check", action="store_true", help="count queries matching float64 ids")
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for torch and faiss alike"
    )
    args = parser.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    nq, repeats = args.nq, args.repeats
    if args.quick:
        shapes = [(max(1000, nb // 50), d) for nb, d in shapes]
        nq, repeats = min(nq, 200), 2
    header(threads)
    for nb, d in shapes:
        run(nb, d, nq, args.k, repeats, args)
    _print_summary()
    with contextlib.suppress(OSError):
        print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
