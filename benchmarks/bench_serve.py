"""Request latency of the web app's photo search against the same ``search_images`` in-process.

One run, side by side, on ``resnet18`` (random weights, eval, CPU) over a gallery of synthetic
embeddings (50,000 by default: the gallery's vectors are drawn directly into the index, since
embedding 50,000 photos would measure the model, not the app):

* **in-process**: ``search.search_images([photo.jpg], k=10)``: read and decode the file,
  preprocess, embed, search the index.
* **app**: ``POST /api/search?k=10`` with the same JPEG's bytes to a real uvicorn server on
  127.0.0.1 (one kept-alive connection), timed end to end by the client: the upload, the byte
  limit, the decode and pixel check, the same embedding and search, the JSON answer.

Rounds alternate between the two so that a shared machine's load falls on both alike. Prints
p50 and p95 of each and the ratio at p95 (goal: the app adds at most 20 %), the processor's
flags and the load average.

Usage::

    python benchmarks/bench_serve.py                 # 50,000 images, 40 rounds
    python benchmarks/bench_serve.py --quick         # 5,000 images, 15 rounds
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image

import featurescope as fs
from featurescope.serve import create_app, running


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


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def _gallery(n: int, dim: int) -> fs.EmbeddingIndex:
    generator = torch.Generator().manual_seed(0)
    index = fs.EmbeddingIndex(dim)
    # Non-negative like a ReLU network's pooled features, so distances look like real ones.
    vectors = torch.rand(n, dim, generator=generator).relu()
    labels = torch.randint(0, 10, (n,), generator=generator)
    index.add(vectors, labels=labels, metadata=[None] * n)
    return index


def _photo() -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="5,000 images, 15 rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds = 5_000, 15
    torch.set_num_threads(args.threads)
    model = fs.create_model("resnet18").eval()
    search = fs.ImageSearch(model, _gallery(args.images, 512), class_names=list("abcdefghij"))
    data = _photo()
    folder = Path(tempfile.mkdtemp())
    photo = folder / "photo.jpg"
    photo.write_bytes(data)

    with running(create_app(search, k=10)) as url:
        where = urlsplit(url)
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=120)

        def app() -> list[int]:
            connection.request(
                "POST", "/api/search?k=10", body=data, headers={"content-type": "image/jpeg"}
            )
            response = connection.getresponse()
            answer = json.loads(response.read())
            assert response.status == 200, answer
            return [h["id"] for h in answer["neighbours"]]

        def local() -> list[int]:
            ids: list[int] = search.search_images([photo], k=10).ids[0].tolist()
            return ids

        assert app() == local()  # the same answer, before anything is timed
        for _ in range(3):  # warm both paths (allocators, caches, the connection)
            app()
            local()
        times: dict[str, list[float]] = {"in-process": [], "app": []}
        for _ in range(args.rounds):
            for name, fn in (("in-process", local), ("app", app)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        connection.close()

    print(
        f"photo search, resnet18 (CPU, {args.threads} torch thread(s)), gallery of "
        f"{args.images:,} x 512, k=10, {args.rounds} rounds"
    )
    for name, values in times.items():
        print(
            f"  {name:>10}: p50 {1e3 * _percentile(values, 50):7.1f} ms   "
            f"p95 {1e3 * _percentile(values, 95):7.1f} ms"
        )
    ratio = _percentile(times["app"], 95) / _percentile(times["in-process"], 95)
    median_ratio = statistics.median(times["app"]) / statistics.median(times["in-process"])
    print(f"  app / in-process: p95 {ratio:.3f}x, p50 {median_ratio:.3f}x (goal: p95 <= 1.20x)")
    print(f"processor flags: {_flags()}; {os.cpu_count()} CPUs")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
