"""``make gpu-check``'s baseline: a plain Celery worker running the same 100 ms GPU task, as a careful user would set
it up (prefork, concurrency 1, acks_late, prefetch 1, JSON), pinned with ``CUDA_VISIBLE_DEVICES``."""

from __future__ import annotations

import os

from celery import Celery

import gpu_work

QUEUE = "gpucheck.raw"
app = Celery("gpucheck_raw", broker=os.environ.get("GPU_CHECK_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_backend=None,
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)


@app.task(name="gpucheck.busy", ignore_result=True)
def busy(ms: float) -> None:
    gpu_work.busy(ms, "raw", "raw")
