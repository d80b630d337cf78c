"""Redis's CPU per task: what queueing, claiming and finishing an empty task costs the one Redis core a fleet shares.

Each side runs alone on the bench's Redis (the other side's worker is stopped), with handlers that return at once
and write nothing (``work`` with ``ms=0, span=False``), so what Redis does is the system's own work per task:

- gpufleet: one worker slot (``gpufleet.worker.process``, as ``gpufleet run`` starts it); tasks built as a trigger
  builds them and queued with ``Registry.enqueue_many`` in chunks of 500 (``CHUNK``) (the trigger's ``batch_max`` here).
- raw Celery: ``celery worker`` as the other figures run it (prefork, concurrency 1, acks_late, prefetch 1), tasks
  sent with ``send_task``.

Redis's main-thread CPU (``INFO cpu``) is read before and after each step, enqueue then run (claim + handler +
finish), and ``INFO commandstats`` (reset before each side) says which commands it went to: commands a Lua script
calls are counted too. The dispatcher, which delivers gpufleet's records and has no counterpart in raw Celery, is not
running. The idle cost (each side's workers waiting on an empty queue, per second) is measured first and shown, not
subtracted.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import raw_celery_app
from gpufleet.config import Fleet
from gpufleet.registry.messages import MessageFactory
from gpufleet.registry.model import Enqueued, NewTask
from world import BenchError, World, say

CHUNK = 500
# Commands that read, for the reads-per-task figure (a pop that finds nothing is a read too).
READS = {"get", "hget", "hmget", "hgetall", "hexists", "exists", "llen", "lrange", "zscore", "zrange", "zrangebyscore",
         "zcard", "smembers", "sismember", "rpop", "lpop", "brpop", "blpop", "brpoplpush", "rpoplpush", "lmove",
         "blmove", "xrange", "xread", "xreadgroup", "zpopmin", "bzpopmin", "scan", "type", "ttl"}  # fmt: skip


@dataclass
class Cost:
    tasks: int
    enqueue_us: float  # Redis CPU per task while the tasks were queued
    run_us: float  # ... while a worker claimed, ran and finished them
    idle_us_per_s: float  # ... per second with the worker idle on an empty queue
    seconds: float  # the run's wall time
    reads: float  # read commands per task, run and enqueue together (pops that found nothing included)
    trips: float  # requests Redis read from its clients per task (total_reads_processed): round trips, roughly
    top: list[tuple[str, float, float]] = field(default_factory=list)  # (command, calls per task, µs per task)

    @property
    def total_us(self) -> float:
        return self.enqueue_us + self.run_us

    def breakdown(self) -> str:
        return ", ".join(f"{name} {calls:.1f}x {us:.1f} µs" for name, calls, us in self.top)


def cpu_split(client: Any) -> tuple[float, float]:
    """Redis's main thread's CPU seconds, user and system; the whole process's on a Redis without the per-thread
    figures (the background threads free memory and flush files: little, here)."""
    info = client.info("cpu")
    if "used_cpu_user_main_thread" in info:
        return float(info["used_cpu_user_main_thread"]), float(info["used_cpu_sys_main_thread"])
    return float(info["used_cpu_user"]), float(info["used_cpu_sys"])


def cpu_s(client: Any) -> float:
    return sum(cpu_split(client))


def reads_processed(client: Any) -> int:
    """Read events Redis handled on client connections: one per request (a pipeline's, or a blocking pop's)."""
    return int(client.info("stats").get("total_reads_processed", 0))


def command_stats(client: Any) -> dict[str, tuple[int, float]]:
    """command -> (calls, µs) since the last ``CONFIG RESETSTAT``, without the bench's own INFO and CONFIG."""
    stats = client.info("commandstats")
    out = {}
    for key, value in stats.items():
        name = key.removeprefix("cmdstat_")
        if name not in ("info", "config", "hgetall", "llen", "hlen", "ping"):  # the bench's own polling
            out[name] = (int(value["calls"]), float(value["usec"]))
    return out


def measure_side(w: World, name: str, enqueue: Any, done: Any, n: int) -> Cost:
    """Idle cost, then enqueue ``n`` tasks and wait until the worker has finished them, reading Redis's CPU
    between the steps."""
    r = w.redis
    start = cpu_s(r)
    time.sleep(3)
    idle = (cpu_s(r) - start) / 3
    r.config_resetstat()
    before, trips_before, split_before = cpu_s(r), reads_processed(r), cpu_split(r)
    enqueue(n)
    queued = cpu_s(r)
    began = time.perf_counter()
    deadline = time.monotonic() + 60 + n / 50
    while not done():
        if time.monotonic() > deadline:
            raise BenchError(f"{name}: {n} empty tasks not finished in {60 + n / 50:.0f} s")
        time.sleep(0.2)
    seconds = time.perf_counter() - began
    after, trips = cpu_s(r), (reads_processed(r) - trips_before) / n
    user, system = (b - a for a, b in zip(split_before, cpu_split(r), strict=True))
    stats = command_stats(r)
    reads = sum(calls for cmd, (calls, _) in stats.items() if cmd in READS) / n
    top = sorted(((cmd, calls / n, us / n) for cmd, (calls, us) in stats.items()), key=lambda t: -t[2])[:8]
    cost = Cost(n, (queued - before) / n * 1e6, (after - queued) / n * 1e6, idle * 1e6, seconds, reads, trips, top)
    say(f"  {name}: enqueue {cost.enqueue_us:.1f} µs/task, run {cost.run_us:.1f} µs/task ({seconds:.1f} s), "
        f"idle {cost.idle_us_per_s:.0f} µs/s, {reads:.1f} reads/task, {trips:.1f} round trips/task, user "
        f"{user / n * 1e6:.0f} µs + system {system / n * 1e6:.0f} µs; "
        f"{cost.breakdown()}")  # fmt: skip
    return cost


def empty_tasks(fleet: Fleet, numbers: Iterable[int]) -> list[NewTask]:
    """Empty ``work`` tasks (``ms=0, span=False``), numbered ``numbers``, built as a trigger builds them."""
    s, fn, now = fleet.settings, fleet.functions["work"], time.time()
    factory = MessageFactory(s.redis.key_prefix, s.worker.kill_grace_s)
    tasks = []
    for i in numbers:
        meta = {"source": f"bench:cpu/{i}", "trigger": "bench"}
        event = {"ms": 0, "span": False, "side": "gpufleet"}
        tasks.append(NewTask(message=factory.build(f"bench-cpu-{i:06d}", fn, event, meta),
                             on_success=fn.on_success or s.defaults.on_success,
                             on_failure=fn.on_failure or s.defaults.on_failure,
                             max_attempts=fn.max_attempts, source=meta["source"], event_ts=now,
                             origin="trigger:bench"))  # fmt: skip
    return tasks


def gpufleet_side(w: World, n: int) -> Cost:
    ids = itertools.count()
    finished_key = f"{w.fleet.settings.redis.key_prefix}:m:finished"

    def finished() -> int:
        return sum(int(v) for v in w.redis.hgetall(finished_key).values())

    def enqueue(count: int) -> None:
        for chunk in range(0, count, CHUNK):
            tasks = empty_tasks(w.fleet, itertools.islice(ids, min(CHUNK, count - chunk)))
            if any(x is not Enqueued.CREATED for x in w.registry.enqueue_many(tasks)):
                raise BenchError("enqueue_many reported duplicates on a flushed Redis")

    with w.children.session(w.gpu_worker()) as children:
        enqueue(1)
        w.children.wait_until(lambda: finished() >= 1, 120, "gpufleet: a warm-up task", children)
        base = finished()
        return measure_side(w, "gpufleet", enqueue, lambda: finished() - base >= n, n)


def raw_side(w: World, n: int) -> Cost:
    app = raw_celery_app.make_app(w.redis_url)
    queue = raw_celery_app.QUEUE

    def idle() -> bool:
        return int(w.redis.llen(queue)) == 0 and int(w.redis.hlen("unacked")) == 0

    def enqueue(count: int) -> None:
        for _ in range(count):
            app.send_task(raw_celery_app.WORK_TASK, queue=queue, kwargs={"ms": 0, "span": False, "side": "raw"})

    try:
        with w.children.session(w.raw_worker()) as children:
            enqueue(1)
            time.sleep(0.5)
            w.children.wait_until(idle, 120, "raw Celery: a warm-up task", children)
            return measure_side(w, "raw Celery", enqueue, idle, n)
    finally:
        app.close()


def redis_cpu_both(w: World, n: int) -> tuple[Cost, Cost]:
    """gpufleet's cost and raw Celery's, one side after the other, each on a flushed Redis."""
    w.flush()
    ours = gpufleet_side(w, n)
    w.flush()
    theirs = raw_side(w, n)
    w.notes.append(
        f"Redis CPU per empty task, {n:,} tasks, top commands by CPU (calls and µs per task): gpufleet "
        f"{ours.breakdown()}; raw Celery {theirs.breakdown()}. Idle: gpufleet {ours.idle_us_per_s:.0f} µs/s, raw "
        f"Celery {theirs.idle_us_per_s:.0f} µs/s. Run time: gpufleet {ours.seconds:.1f} s, raw {theirs.seconds:.1f} s."
    )
    return ours, theirs
