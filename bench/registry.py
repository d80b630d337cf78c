"""gpufleet registry benchmark: what a task costs in Redis, and what a cancel costs with a million queued.

    python bench/registry.py                  # 10^5 tasks for memory, 10^6 queued for cancel; about 3 minutes
    python bench/registry.py --cancel-n 100000   # a quicker look

Starts its own Redis (``start_redis``) and measures, with the fleet's own code (``Ingest``'s ``MessageFactory`` and
``Registry.enqueue_many``):

1. Redis memory per QUEUED task at 10^5 queued (``used_memory`` before and after; the record, its indexes and its
   Celery message in the queue), then per finished task (claimed and finished as a worker does, the queue emptied
   as workers empty it). The ~200-byte events of the ingest bench, and a small result.
2. The time of one cancel of a queued task with 10^6 queued (median of 20), next to the baseline: the ``LREM`` of
   its message that cancel used to do (same list, same run). Redis's own SLOWLOG duration is shown for both.

A task's Celery message lives in kombu's list for its priority level (``<queue>\x06\x16<level>``, the queue's own
name only for level 0): the bench empties and scans those lists, and checks that they hold what it queued (it once
measured the queue's bare name, an empty key, for both).

The report goes to stdout and to ``bench/results/registry.md``.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402 - after the path is set
import redis  # noqa: E402

from gpufleet.config import load_fleet  # noqa: E402
from gpufleet.control.plane import ControlPlane  # noqa: E402
from gpufleet.dev.services import start_redis, stop_service  # noqa: E402
from gpufleet.registry.messages import DEFAULT_PRIORITY, MessageFactory, priority_list  # noqa: E402
from gpufleet.registry.model import NewTask, State  # noqa: E402
from gpufleet.registry.store import Registry  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from world import ingest_value  # noqa: E402 - the ingest bench's events

RESULTS = ROOT / "bench" / "results" / "registry.md"


def fleet_config(workdir: Path, redis_url: str) -> Path:
    (workdir / "triggers").mkdir(exist_ok=True)
    config = workdir / "fleet.yaml"
    config.write_text(orjson.dumps({
        "redis": {"url": redis_url, "key_prefix": "gpufleet"},
        "functions": [str(ROOT / "bench")], "triggers": [str(workdir / "triggers")],
    }).decode())  # fmt: skip
    return config


def enqueue(registry: Registry, factory: MessageFactory, fn: object, start: int, n: int) -> None:
    batch: list[NewTask] = []
    for i in range(start, start + n):
        task_id = f"kafka-requests-0-{i}"
        event = orjson.loads(ingest_value(i))["payload"]
        message = factory.build(task_id, fn, event, {"source": f"kafka:requests/0/{i}", "trigger": "requests"})  # type: ignore[arg-type]
        batch.append(NewTask(message, "kafka:///gpufleet.success", "kafka:///gpufleet.failure", 3,
                             f"kafka:requests/0/{i}", time.time(), origin="trigger:requests"))  # fmt: skip
        if len(batch) == 500:
            registry.enqueue_many(batch)
            batch = []
    if batch:
        registry.enqueue_many(batch)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-n", type=int, default=100_000)
    parser.add_argument("--cancel-n", type=int, default=1_000_000)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below: stop what was started
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="gpufleet-registry-") as tmp:
        service, _ = start_redis(Path(tmp))
        try:
            r = redis.Redis.from_url(service.url)
            fleet = load_fleet(fleet_config(Path(tmp), service.url), env={})
            registry = Registry(r, "gpufleet")
            factory = MessageFactory("gpufleet", 10.0)
            fn = fleet.functions["noop"]
            queue = factory.build("x", fn, {}, {}).queue
            messages = priority_list(queue, DEFAULT_PRIORITY)  # where every message of this bench waits

            # 1. memory per queued and per finished task
            n = args.memory_n
            base = int(r.info("memory")["used_memory"])
            enqueue(registry, factory, fn, 0, n)
            queued = (int(r.info("memory")["used_memory"]) - base) / n
            print(f"queued: {queued:.0f} bytes per task", file=sys.stderr)
            assert r.llen(messages) == n, f"{messages!r} holds {r.llen(messages)} messages, not {n}"
            r.delete(messages)  # workers took the messages
            result = orjson.dumps({"ok": True, "seq": 1})
            for start in range(0, n, 1000):
                pipe_ids = [f"kafka-requests-0-{i}" for i in range(start, min(n, start + 1000))]
                for task_id in pipe_ids:
                    registry.claim(task_id, State.QUEUED, "", "host/1/1/x", 30, "vgpu0@host", "vgpu0:virtual")
                    registry.finish(task_id, "host/1/1/x", State.SUCCEEDED, {"result": result}, [])
            finished = (int(r.info("memory")["used_memory"]) - base) / n
            print(f"finished: {finished:.0f} bytes per task", file=sys.stderr)
            rows.append(("Redis per QUEUED task, 10^5 queued", f"{queued:,.0f} B", "", "<= 2,048 B"))
            rows.append(("Redis per finished task (retained)", f"{finished:,.0f} B", "", "<= 1,024 B"))
            r.flushdb()

            # 2. cancel with 10^6 queued, against the LREM it used to do
            m = args.cancel_n
            print(f"queueing {m:,} tasks...", file=sys.stderr)
            enqueue(registry, factory, fn, 0, m)
            assert r.llen(messages) == m, f"{messages!r} holds {r.llen(messages)} messages, not {m}"
            plane = ControlPlane(fleet, registry)
            ours, lrem, ours_slow, lrem_slow = [], [], [], []
            r.config_set("slowlog-log-slower-than", 0)
            for k in range(20):
                victim = f"kafka-requests-0-{(k * 37_001) % m}"
                r.slowlog_reset()
                t0 = time.perf_counter()
                assert plane.cancel(victim)["outcome"] == "cancelled"
                ours.append((time.perf_counter() - t0) * 1000)
                ours_slow.append(max(e["duration"] for e in r.slowlog_get(128)) / 1000)
                # The baseline: remove one message from the list, as cancel did before (it scans the list).
                message = factory.build(victim, fn, {"seq": -1}, {}).envelope  # not in the list: a full scan
                r.slowlog_reset()
                t0 = time.perf_counter()
                r.lrem(messages, -1, message)
                lrem.append((time.perf_counter() - t0) * 1000)
                lrem_slow.append(max(e["duration"] for e in r.slowlog_get(128)) / 1000)
            r.config_set("slowlog-log-slower-than", 10_000)
            med = statistics.median
            rows.append((f"One cancel, {m:,} queued (client-side)", f"{med(ours):.2f} ms",
                         f"{med(lrem):.2f} ms (LREM)", f"{med(ours) / med(lrem):.3f}x"))  # fmt: skip
            rows.append(("... its longest Redis command (SLOWLOG)", f"{med(ours_slow):.2f} ms",
                         f"{med(lrem_slow):.2f} ms", "Redis blocked for others meanwhile"))  # fmt: skip
        finally:
            stop_service(service)
    lines = [f"# gpufleet registry bench ({time.strftime('%Y-%m-%d %H:%M')})", "",
             "| figure | gpufleet | baseline (same run) | ratio / target |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
