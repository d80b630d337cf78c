"""The GPU work ``make gpu-check`` runs (:mod:`gpu_check`), shared by its gpufleet functions
(``gpu_check_functions.py``) and its raw Celery baseline (``gpu_check_raw.py``).

Each runs on ``cuda:0`` (the worker's pinned GPU) when torch sees CUDA, else on the CPU (a rehearsal, or a machine
without a GPU): the same code either way. ``GPU_CHECK_REDIS_URL`` names the Redis the spans go to.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import redis

SPANS = "gpucheck:spans:{side}"  # "start,end,worker" per task, for the duty cycle


@functools.cache
def client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["GPU_CHECK_REDIS_URL"])


@functools.cache
def device() -> Any:
    import torch

    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


@functools.cache
def _square(n: int = 2048) -> Any:
    import torch

    return torch.randn(n, n, device=device())


def sync() -> None:
    import torch

    if device().type == "cuda":
        torch.cuda.synchronize()


def busy(ms: float, side: str, worker: str) -> None:
    """``ms`` of GPU work (matmuls, each waited for: the GPU is busy, the GIL free), its span recorded."""
    start = time.time()
    a = _square()
    deadline = time.perf_counter() + ms / 1000
    if device().type == "cuda":
        while time.perf_counter() < deadline:
            a @ a
            sync()
    else:  # a rehearsal: a CPU matmul holds the GIL, which a GPU's would not; sleep as a GPU wait does
        time.sleep(ms / 1000)
    client().rpush(SPANS.format(side=side), f"{start!r},{time.time()!r},{worker}")


def matmul(n: int, repeat: int) -> dict[str, Any]:
    """``repeat`` n x n float32 matmuls: their TFLOP/s, and whether the device's answer matches the CPU's."""
    import torch

    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    da, db = a.to(device()), b.to(device())
    (da @ db).sum().item()  # warm: kernels chosen, clocks up
    sync()
    began = time.perf_counter()
    for _ in range(repeat):
        out = da @ db
    sync()
    took = time.perf_counter() - began
    sample = (a[:64] @ b).float()
    matches = bool(torch.allclose(out[:64].float().cpu(), sample, rtol=1e-2, atol=1e-1))
    return {"tflops": round(2 * n**3 * repeat / took / 1e12, 2), "matches_cpu": matches, "device": str(device())}


@functools.cache
def model() -> Any:
    """A small real model: a 3-layer MLP, 1024 wide, in eval mode on the device."""
    import torch

    torch.manual_seed(3)
    layers = torch.nn.Sequential(
        torch.nn.Linear(512, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, 256),
    )
    return layers.to(device()).eval()


def embed(seeds: list[int]) -> list[float]:
    """One forward pass of :func:`model` over one input per seed; each output's norm."""
    import torch

    with torch.no_grad():
        x = torch.stack([torch.randn(512, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device())
        norms = model()(x).norm(dim=1).tolist()
    return [round(float(v), 4) for v in norms]
