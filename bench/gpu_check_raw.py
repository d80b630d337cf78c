"""``make gpu-check``'s baseline: a plain Celery worker running the same 100 ms GPU task, set up as the bench's raw
Celery baseline is (:mod:`raw_celery_app`: prefork, concurrency 1, acks_late, prefetch 1, JSON), pinned with
``CUDA_VISIBLE_DEVICES``."""

from __future__ import annotations

import os

import gpu_work
import raw_celery_app

QUEUE = "gpucheck.raw"
app = raw_celery_app.make_app(os.environ.get("GPU_CHECK_REDIS_URL", "redis://127.0.0.1:6379/0"))


@app.task(name="gpucheck.busy", ignore_result=True)  # type: ignore[untyped-decorator]
def busy(ms: float) -> None:
    gpu_work.busy(ms, "raw", "raw")
