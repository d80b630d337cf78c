"""The batching figures: one function, batched and not, on the same gpufleet worker in the same run.

``batchwork`` (``Batch(max_size=8, max_wait_ms=20)``) sleeps 20 ms plus 5/7 ms per event after the first: a batch
of 8 takes 25 ms, as a GPU forward pass of 8 small items might. ``work`` is the same function unbatched: 20 ms per
event. Both read their figures from the registry's records (created, started, finished), so nothing is added to the
handlers:

- throughput: ``n`` tasks queued at once (one ``enqueue_many``), from the first start to the last finish;
- latency at low load: tasks queued one at a time, 10 per second (a fifth of the unbatched function's capacity), from
  queued to finished; the two functions alternate in blocks of 10, so drift on the machine hits both alike;
- latency under load: the same, with arrivals at random (exponential gaps) at 70 % of the unbatched function's
  capacity (35 per second), where tasks queue behind each other and the batched function's batches of 2-4 form.

The throughput turns alternate which function goes first.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpufleet.registry.messages import MessageFactory
from gpufleet.registry.model import Enqueued, NewTask
from gpufleet.registry.store import Registry

BATCHED, SINGLE = "batchwork", "work"
PACE_S = 0.1  # low load: 10 per second
LOADED_RATE = 35.0  # per second: 70 % of 50 per second, the unbatched function's capacity (20 ms each)


@dataclass(frozen=True)
class Figures:
    throughput: float  # tasks per second
    p50_ms: float  # queued -> finished at low load
    p99_ms: float
    loaded_p50_ms: float  # queued -> finished at 70 % load
    loaded_p99_ms: float
    mean_batch: float  # events per call under load (1 for the unbatched function)


def run_both(registry: Registry, fleet: Any, n: int, paced: int, wait: Callable[[Callable[[], bool], float, str],
             None]) -> tuple[Figures, Figures]:  # fmt: skip
    """(batched, unbatched). ``wait(cond, timeout_s, what)`` waits for a condition while watching the worker."""
    factory = MessageFactory(fleet.settings.redis.key_prefix, fleet.settings.worker.kill_grace_s)
    ids = itertools.count()

    def enqueue(function: str, count: int) -> list[str]:
        fn, s = fleet.functions[function], fleet.settings
        tasks, now = [], time.time()
        for i in itertools.islice(ids, count):
            task_id = f"bench-batch-{function}-{i:06d}"
            event = {"ms": 20.0, "span": False}  # work() writes nothing to Redis then, as batchwork writes nothing
            message = factory.build(task_id, fn, event, {"source": f"bench:{i}"})
            tasks.append(NewTask(message, s.defaults.on_success, s.defaults.on_failure, 1, f"bench:{i}", now,
                                 origin="trigger:bench"))  # fmt: skip
        if any(x is not Enqueued.CREATED for x in registry.enqueue_many(tasks)):
            raise RuntimeError("enqueue_many reported duplicates")
        return [t.message.task_id for t in tasks]

    def done(task_ids: list[str]) -> Callable[[], bool]:
        return lambda: all(r is not None and r["state"] == "SUCCEEDED" for r in registry.get_many(task_ids))

    def times(task_ids: list[str]) -> list[tuple[float, float, float]]:
        pipe = registry.client.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hmget(registry.keys.task(task_id), "created_at", "started_at", "finished_at")
        return [(float(a), float(b), float(c)) for a, b, c in pipe.execute()]

    def throughput(function: str) -> float:
        task_ids = enqueue(function, n)
        wait(done(task_ids), 60 + n * 0.05, f"{n} {function} tasks")
        rows = times(task_ids)
        return n / (max(r[2] for r in rows) - min(r[1] for r in rows))

    def paced_block(function: str, count: int, gap_s: Callable[[], float]) -> list[str]:
        out = []
        next_at = time.perf_counter()
        for _ in range(count):
            out += enqueue(function, 1)
            next_at += gap_s()
            time.sleep(max(0.0, next_at - time.perf_counter()))  # the schedule's, not the gap after a slow enqueue
        return out

    def latencies(gap_s: Callable[[], float], block_size: int) -> dict[str, list[tuple[float, float, float]]]:
        out: dict[str, list[tuple[float, float, float]]] = {BATCHED: [], SINGLE: []}
        for block in range(0, paced, block_size):
            for function in (BATCHED, SINGLE):
                task_ids = paced_block(function, min(block_size, paced - block), gap_s)
                wait(done(task_ids), 60, f"paced {function} tasks")
                out[function] += times(task_ids)
        return out

    warm = enqueue(BATCHED, 1) + enqueue(SINGLE, 1)
    wait(done(warm), 60, "a warm-up task of each")
    rates: dict[str, list[float]] = {BATCHED: [], SINGLE: []}
    for order in ((BATCHED, SINGLE), (SINGLE, BATCHED)):
        for function in order:
            rates[function].append(throughput(function))
    low = latencies(lambda: PACE_S, 10)
    arrivals = random.Random(7)  # the same arrivals in every run
    loaded = latencies(lambda: arrivals.expovariate(LOADED_RATE), 2 * paced)
    return tuple(  # type: ignore[return-value]
        Figures(statistics.mean(rates[f]), *quantiles(low[f]), *quantiles(loaded[f]), mean_batch(loaded[f]))
        for f in (BATCHED, SINGLE)
    )


def quantiles(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """p50 and p99, in ms, of queued -> finished."""
    ms = sorted((finished - created) * 1000 for created, _, finished in rows)
    return statistics.median(ms), ms[int(0.99 * (len(ms) - 1))]


def mean_batch(rows: list[tuple[float, float, float]]) -> float:
    """Events per call: the events of one batch call share their start."""
    return len(rows) / len({started for _, started, _ in rows})
