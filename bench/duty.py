"""Worker duty cycle: one gpufleet worker slot and one raw Celery worker, side by side, take blocks of the same tasks
in turn; the figure is the share of wall time a handler runs, and the idle gap between one handler's end and the
next one's start.

Three kinds of task, each its own turn (``Kind``):

- 20 ms and 100 ms handlers that sleep, as a handler waiting on its GPU does: the GIL is free while they run, so
  gpufleet's helper thread (``worker/ahead.py``) claims the next task and writes the last outcome meanwhile;
- handlers that hold the GIL: a fixed amount of pure-Python work, about 20 ms of it here (measured once, in the
  bench's process), the same on both sides. The helper thread's Python competes with the handler's, so its work
  shows up as longer spans, which the table compares with raw Celery's.
"""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import handlers
import raw_celery_app
from gpufleet.registry.messages import MessageFactory, function_queue
from gpufleet.registry.model import Enqueued, NewTask
from world import GPU_QUEUES, PREFIX, BenchError, World, percentile, redis_lines, say

BLOCK = 50  # tasks per block; the two workers take turns, so drift on a noisy machine hits both
Span = tuple[float, float]


@dataclass(frozen=True)
class Kind:
    label: str
    ms: float
    spin: bool = False  # hold the GIL (pure-Python work) instead of sleeping

    def event(self, warm: bool, side: str, flush: int) -> dict[str, Any]:
        rounds = round(self.ms * rounds_per_ms()) if self.spin else 0
        return {"ms": self.ms, "rounds": rounds, "warm": warm, "side": side, "flush": flush}


@functools.cache
def rounds_per_ms() -> int:
    """:func:`handlers.rounds_per_ms`, in a fresh process: the bench's own has the earlier phases' threads (Kafka
    clients) competing for its GIL, and measured 2.5x too few. Both sides then run the same work."""
    code = "import handlers; print(handlers.rounds_per_ms())"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout)


SLEEP_20 = Kind("20 ms tasks", 20.0)
SLEEP_100 = Kind("100 ms tasks", 100.0)
SPIN_20 = Kind("20 ms tasks that hold the GIL", 20.0, spin=True)


@dataclass
class Duty:
    duty: float  # sum of task spans / wall time (per block: first start to last end)
    gap_ms: float  # median idle time between one task's end and the next one's start, within a block
    task_ms: float  # mean task span
    tasks_per_s: float


def blocks_of(items: list[Any], sizes: list[int]) -> list[list[Any]]:
    out, i = [], 0
    for size in sizes:
        out.append(items[i : i + size])
        i += size
    return out


def duty_of(blocks: list[list[Span]]) -> Duty:
    busy = wall = 0.0
    gaps: list[float] = []
    for spans in blocks:
        busy += sum(end - start for start, end in spans)
        wall += spans[-1][1] - spans[0][0]
        gaps += [spans[i + 1][0] - spans[i][1] for i in range(len(spans) - 1)]
    count = sum(len(spans) for spans in blocks)
    return Duty(busy / wall, percentile(gaps, 0.5) * 1000, busy / count * 1000, count / wall)


def gpufleet_enqueuer(w: World, kind: Kind) -> Callable[[int, bool], None]:
    """Tasks built as ``Ingest.parse`` builds them (minus the parsing), a whole block in one ``enqueue_many``."""
    s = w.fleet.settings
    fn = w.fleet.functions["work"]
    if function_queue(PREFIX, fn) not in GPU_QUEUES:
        raise BenchError(f"function 'work' goes to {function_queue(PREFIX, fn)}, the worker reads {GPU_QUEUES}")
    factory = MessageFactory(s.redis.key_prefix, s.worker.kill_grace_s)
    ids = itertools.count()

    def enqueue(count: int, warm: bool) -> None:
        tag, now = "warm" if warm else "duty", time.time()
        tasks = []
        for i in itertools.islice(ids, count):
            meta = {"source": f"bench:{tag}/{i}", "trigger": "bench"}
            message = factory.build(f"bench-{kind.label}-{tag}-{i:05d}", fn, kind.event(warm, "gpufleet", count), meta)
            tasks.append(NewTask(message=message, on_success=fn.on_success or s.defaults.on_success,
                                 on_failure=fn.on_failure or s.defaults.on_failure, max_attempts=fn.max_attempts,
                                 source=meta["source"], event_ts=now, origin="trigger:bench"))  # fmt: skip
        if any(x is not Enqueued.CREATED for x in w.registry.enqueue_many(tasks)):
            raise BenchError("enqueue_many reported duplicates on a flushed Redis")

    return enqueue


def raw_enqueuer(w: World, app: Any, kind: Kind) -> Callable[[int, bool], None]:
    """``send_task`` to a queue nobody reads, then the whole block moves to the worker's queue in one transaction.

    So the worker, like gpufleet's, finds its block in the queue at once, and publishing does not overlap the run.
    """
    staging = f"{raw_celery_app.QUEUE}.staging"

    def enqueue(count: int, warm: bool) -> None:
        for _ in range(count):
            app.send_task(raw_celery_app.WORK_TASK, queue=staging, kwargs=kind.event(warm, "raw", count))
        with w.redis.pipeline(transaction=True) as pipe:
            for _ in range(count):
                pipe.rpoplpush(staging, raw_celery_app.QUEUE)  # oldest first: the order is kept
            pipe.execute()

    return enqueue


def duty_both(w: World, kind: Kind, n: int) -> tuple[Duty, Duty]:
    """``n`` tasks of ``kind`` per side; blocks of tasks go to one worker at a time, the sides alternating."""
    w.flush()
    app = raw_celery_app.make_app(w.redis_url)
    enqueue = {"gpufleet": gpufleet_enqueuer(w, kind), "raw": raw_enqueuer(w, app, kind)}

    def count(key: str) -> int:
        return int(w.redis.llen(key))

    def finished(side: str, total: int) -> Callable[[], bool]:
        return lambda: count(handlers.spans_key(side)) >= total

    try:
        with w.children.session(w.gpu_worker(), w.raw_worker()) as children:
            for push in enqueue.values():
                push(1, True)
            w.children.wait_until(lambda: all(count(handlers.warm_key(side)) >= 1 for side in enqueue), 120,
                                  "a warm-up task on each worker", children, interval_s=0.05)  # fmt: skip
            say(f"  {kind.label}: {n} tasks per worker, in alternating blocks of {BLOCK}")
            sizes: dict[str, list[int]] = {side: [] for side in enqueue}
            while any(sum(done) < n for done in sizes.values()):
                for side, push in enqueue.items():
                    block = min(BLOCK, n - sum(sizes[side]))
                    if block <= 0:
                        continue
                    push(block, False)
                    sizes[side].append(block)
                    w.children.wait_until(finished(side, sum(sizes[side])), 30 + block * kind.ms / 1000 * 10,
                                          f"{side}: a block of {block} tasks", children, interval_s=0.05)  # fmt: skip
            spans: dict[str, list[Span]] = {}
            for side in enqueue:
                rows = redis_lines(w.redis, handlers.spans_key(side))
                spans[side] = sorted((float(a), float(b)) for a, b in (row.split(",") for row in rows))
    finally:
        app.close()
    return (duty_of(blocks_of(spans["gpufleet"], sizes["gpufleet"])),
            duty_of(blocks_of(spans["raw"], sizes["raw"])))  # fmt: skip
