"""The baseline: a plain Celery app with the same tasks, run as ``celery -A raw_celery_app worker``.

Settings match what a careful user would pick for GPU work without gpufleet: prefork, concurrency 1, acks_late,
prefetch multiplier 1, JSON. ``BENCH_REDIS_URL`` names the broker; ``bench`` must be on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from celery import Celery, signals

import handlers

QUEUE = "bench.raw"
STAMP_TASK = "bench.stamp"
WORK_TASK = "bench.work"


def make_app(broker_url: str) -> Celery:
    app = Celery("bench_raw", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
    )
    app.task(name=STAMP_TASK, ignore_result=True)(handlers.stamp)
    app.task(name=WORK_TASK, ignore_result=True)(handlers.work)
    return app


app = make_app(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


def _watch_parent(**_: Any) -> None:
    """Stop warm if the harness that started us is gone (it stops us by PID; this covers a SIGKILL of it)."""
    parent = os.environ.get("BENCH_PARENT_PID")
    if not parent:
        return

    def loop() -> None:
        while os.getppid() == int(parent):
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=loop, name="bench-parent-watch", daemon=True).start()


signals.worker_init.connect(_watch_parent, weak=False)
