"""Functions of two GPUs, of one, and of a MIG instance, for the multi-GPU and MIG tests (kept apart: a host that
serves a 2-GPU function runs a worker for each pair of its GPUs). Each run lists itself under ``occupied:<host>`` as
"<gpus> <start> <end> <task id>"."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from gpufleet import Context, Gpu, function


def _occupy(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    gpus = os.environ.get("GPUFLEET_GPUS", "")
    r = redis.Redis.from_url(os.environ["TEST_REDIS_URL"])
    r.incr(f"runs:{ctx.task_id}")
    start = time.time()
    time.sleep(event.get("seconds", 0.2))
    r.rpush(f"occupied:{os.environ['GPUFLEET_WORKER__HOSTNAME']}", f"{gpus} {start} {time.time()} {ctx.task_id}")
    memory = ctx.gpu_memory
    return {"worker": ctx.worker, "gpus": gpus.split(","), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "memory_mb": memory and memory.total_mb}  # fmt: skip


pair = function(name="pair", gpus=2, max_attempts=5)(_occupy)
single = function(name="single", max_attempts=5)(_occupy)
tiny = function(name="tiny", gpu=Gpu(mig="1g.10gb"))(_occupy)  # MIG instances of that profile alone
small = function(name="small", gpu_memory_gb=8)(_occupy)  # any GPU or MIG instance of 8 GiB
