"""Functions of one and of two GPUs, for the multi-GPU tests (kept apart: a host that serves a 2-GPU function runs a
worker for each pair of its GPUs). Each run lists itself under ``occupied:<host>`` as "<gpus> <start> <end> <task
id>"."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from gpufleet import Context, function


def _occupy(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    gpus = os.environ.get("GPUFLEET_GPUS", "")
    r = redis.Redis.from_url(os.environ["TEST_REDIS_URL"])
    r.incr(f"runs:{ctx.task_id}")
    start = time.time()
    time.sleep(event.get("seconds", 0.2))
    r.rpush(f"occupied:{os.environ['GPUFLEET_WORKER__HOSTNAME']}", f"{gpus} {start} {time.time()} {ctx.task_id}")
    return {"worker": ctx.worker, "gpus": gpus.split(","), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}


pair = function(name="pair", gpus=2, max_attempts=5)(_occupy)
single = function(name="single", max_attempts=5)(_occupy)
