"""EmbeddingIndex on a CUDA device: the same exact answers as the float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import featurescope as fs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def brute_force(g, ids, q, k):
    dist = ((q.double()[:, None, :] - g.double()[None]) ** 2).sum(-1).sqrt().cpu().numpy()
    ids = np.asarray(ids)
    order = np.stack([np.lexsort((ids, row))[:k] for row in dist])
    return torch.tensor(np.take_along_axis(dist, order, 1)), torch.tensor(ids[order])


def _data(kind, n=4000, d=64, nq=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, d, generator=gen)
    if kind == "duplicates":
        g = g[torch.randint(0, n // 10, (n,), generator=gen)]
    elif kind == "offset":
        g = g * 1e-2 + 1000.0
    q = torch.cat(
        [g[: nq // 2], g[: nq - nq // 2] + 1e-3 * torch.randn(nq - nq // 2, d, generator=gen)]
    )
    ids = torch.randperm(10 * n, generator=gen)[:n]
    return g, q, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["random", "duplicates", "offset"])
def test_cuda_search_is_exact(dtype, kind):
    g, q, ids = _data(kind)
    # A small budget: several query tiles, spread over CUDA streams.
    index = fs.EmbeddingIndex(g.shape[1], device="cuda", dtype=dtype, memory_budget=1 << 20)
    index.add(g, ids=ids)
    result = index.search(q, 10)
    assert result.ids.device.type == "cuda"
    ref_d, ref_i = brute_force(g, ids, q, 10)
    assert torch.equal(result.ids.cpu(), ref_i)
    # float64 sums on the GPU may round differently from the CPU's in the last bit.
    torch.testing.assert_close(result.distances.cpu(), ref_d, rtol=1e-12, atol=0)


def test_move_between_devices_and_reload(tmp_path):
    g, q, ids = _data("random", n=500)
    index = fs.EmbeddingIndex(g.shape[1])
    index.add(g, ids=ids, labels=torch.arange(500) % 3)
    cpu_result = index.search(q, 5)
    index.to("cuda")
    cuda_result = index.search(q, 5)
    assert torch.equal(cpu_result.ids, cuda_result.ids.cpu())
    assert torch.equal(cpu_result.labels, cuda_result.labels.cpu())
    path = index.save(tmp_path / "i.safetensors")
    again = fs.EmbeddingIndex.load(path, device="cuda")
    assert torch.equal(again.search(q, 5).ids.cpu(), cpu_result.ids)


def test_tf32_allowed_still_exact():
    g, q, ids = _data("offset")
    index = fs.EmbeddingIndex(g.shape[1], device="cuda")
    index.add(g, ids=ids)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        result = index.search(q, 10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert torch.equal(result.ids.cpu(), brute_force(g, ids, q, 10)[1])
