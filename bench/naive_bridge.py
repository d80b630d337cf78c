"""The baseline bridge: what one writes without gpufleet. Consume Kafka, ``send_task`` per message, commit per poll.

Used in-process by ``bench/run.py`` (ingest rate) and as a process (latency, resident memory)::

    python bench/naive_bridge.py --bootstrap HOST:PORT --redis URL --topic T --group G --mode gpufleet|stamp

``--mode gpufleet`` sends ``gpufleet.run`` with the kwargs a gpufleet worker takes to the function's queue;
``--mode stamp`` sends the raw Celery app's ``bench.stamp`` task to its ``bench.raw`` queue. Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery

# Where a message goes: (task name, kwargs, queue).
Route = tuple[str, dict[str, Any], str]
Router = Callable[[Any, Any], Route]


def bench_consumer(bootstrap: str, topic: str, group: str) -> Any:
    """The consumer settings every baseline shares (and gpufleet's trigger uses by default)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # kafka-python 3.x at import time
        from kafka import KafkaConsumer

    return KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap.split(","),
        group_id=group,
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        fetch_max_wait_ms=50,
        max_poll_records=500,
        auto_offset_reset="earliest",
    )


def plain_celery(redis_url: str) -> Celery:
    app = Celery("naive_bridge", broker=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
    )
    return app


def route_gpufleet(body: Any, record: Any) -> Route:
    meta = {"source": f"kafka:{record.topic}/{record.partition}/{record.offset}", "trigger": "naive"}
    kwargs = {"function": body["function"], "event": body["payload"], "meta": meta}
    return "gpufleet.run", kwargs, f"gpufleet.default.any.{body['function']}"


def route_stamp(body: Any, record: Any) -> Route:
    # sent_ts: when send_task is called, the counterpart of the time gpufleet's trigger stamps a task created.
    return "bench.stamp", {**body["payload"], "sent_ts": time.time()}, "bench.raw"


ROUTERS: dict[str, Router] = {"gpufleet": route_gpufleet, "stamp": route_stamp}


@dataclass
class BridgeTiming:
    """``first``: when the first record was polled; ``done``: when the commit that covered ``target`` returned."""

    target: int | None = None
    seen: int = 0
    first: float | None = None
    done: float | None = None


def run_bridge(consumer: Any, app: Celery, router: Router, stop: threading.Event, timing: BridgeTiming) -> None:
    """Consume until ``stop`` (or until ``timing.target`` messages are published and committed)."""
    while not stop.is_set():
        polled = consumer.poll(timeout_ms=200)
        if not polled:
            continue
        if timing.first is None:
            timing.first = time.perf_counter()
        for records in polled.values():
            for record in records:
                name, kwargs, queue = router(json.loads(record.value), record)
                app.send_task(name, kwargs=kwargs, queue=queue)
                timing.seen += 1
        consumer.commit()
        if timing.target is not None and timing.seen >= timing.target:
            timing.done = time.perf_counter()
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--mode", choices=sorted(ROUTERS), required=True)
    args = parser.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    parent = int(os.environ.get("BENCH_PARENT_PID", "0"))

    def watch_parent() -> None:  # the harness stops us by PID; this covers a SIGKILL of the harness
        while parent and not stop.wait(1):
            if os.getppid() != parent:
                stop.set()

    threading.Thread(target=watch_parent, daemon=True).start()
    consumer = bench_consumer(args.bootstrap, args.topic, args.group)
    try:
        run_bridge(consumer, plain_celery(args.redis), ROUTERS[args.mode], stop, BridgeTiming())
    finally:
        consumer.close(autocommit=False)


if __name__ == "__main__":
    main()
