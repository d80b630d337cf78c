"""gpufleet benchmark: each figure next to a baseline measured in the same run.

    python bench/run.py [--quick]

Starts Redis and Kafka (``LocalServices``) in a temporary folder, writes a temporary fleet there, and measures:

1. trigger ingest rate, against a naive Kafka -> ``send_task`` bridge and against raw kafka-python consumption;
2. end-to-end latency (produced -> handler started), against the naive bridge plus a raw Celery worker;
3. worker duty cycle on 20 ms tasks, against a raw Celery worker;
4. the trigger process's resident memory after ingesting the ingest workload, against the naive bridge's.

Progress goes to stderr; the Markdown table goes to stdout and to ``bench/results/latest.md``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import redis

import batching
import handlers
from duty import SLEEP_20, SLEEP_100, SPIN_20, Duty, Kind, duty_both
from gpufleet.config import load_fleet
from gpufleet.dev.local import LocalServices
from gpufleet.logs import configure_logging
from gpufleet.registry.store import Registry
from gpufleet.settings import LoggingSettings
from gpufleet.triggers.base import keep_freed_memory
from ingest import (
    Ingested,
    ingest_bridge,
    ingest_gpufleet,
    ingest_naive,
    ingest_raw,
    mean_rate,
    memory_gpufleet,
    memory_naive,
)
from redis_cpu import redis_cpu_both
from world import (
    BENCH_DIR,
    FULL,
    PREFIX,
    QUICK,
    TOPICS,
    BenchError,
    Children,
    Sizes,
    World,
    child_env,
    create_topics,
    percentile,
    produce,
    redis_lines,
    say,
    write_fleet,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # kafka-python 3.x at import time
    from kafka import KafkaProducer


RESULTS = BENCH_DIR / "results" / "latest.md"
PHASES = ("ingest", "memory", "latency", "duty", "batch", "redis")


# --------------------------------------------------------------------------------------------------------------------
# 2. End-to-end latency


@dataclass
class Latency:
    p50_ms: float
    p99_ms: float
    max_ms: float
    # Publish -> handler start: gpufleet from the task's creation in Redis (its created_at, stamped by the trigger as
    # it sends the enqueue), naive from its send_task call: what each does once it has the message.
    pub_p50_ms: float = 0.0
    pub_p99_ms: float = 0.0


SIDES = {"gpufleet": TOPICS["latency-gpufleet"], "naive": TOPICS["latency-naive"]}
LATENCY_BLOCK = 50  # timed messages per block; the two sides take turns, so drift on a noisy machine hits both


def stamp_message(side: str, warm: bool) -> bytes:
    """The same bytes go to both sides: gpufleet's trigger routes by ``function``, the naive bridge sends payload."""
    return orjson.dumps({"function": "stamp", "payload": {"produced_ts": time.time(), "warm": warm, "side": side}})


def send_paced(producer: Any, topic: str, side: str, count: int, rate: float, warm: bool) -> None:
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        producer.send(topic, stamp_message(side, warm))
    producer.flush(timeout=30)


def latency_both(w: World) -> tuple[Latency, Latency]:
    """Both pipelines run side by side; paced blocks go to one, then the other, until each has its timed count.

    gpufleet: a ``gpufleet trigger`` process and one GPU worker slot. Naive: the naive bridge process and a raw
    Celery worker. Each side first gets one message (ready: group joined, worker up) and a paced untimed stream.
    """
    s = w.sizes
    w.flush()
    specs = [w.gpu_worker(), w.trigger_cli("latency"), w.raw_worker(),
             w.naive_cli(SIDES["naive"], "bench-latency-naive", "stamp")]  # fmt: skip
    producer = KafkaProducer(bootstrap_servers=w.bootstrap, acks=1, enable_idempotence=False, linger_ms=0)

    def count(key: str) -> int:
        return int(w.redis.llen(key))

    def arrived(side: str, n: int) -> Callable[[], bool]:
        return lambda: count(handlers.starts_key(side)) >= n

    try:
        with w.children.session(*specs) as children:
            for side, topic in SIDES.items():
                producer.send(topic, stamp_message(side, warm=True))
            producer.flush(timeout=30)
            w.children.wait_until(lambda: all(count(handlers.warm_key(side)) >= 1 for side in SIDES), 120,
                                  "one message through each pipeline", children, interval_s=0.05)  # fmt: skip
            for side, topic in SIDES.items():
                send_paced(producer, topic, side, s.latency_warm, s.latency_rate, warm=True)
            w.children.wait_until(lambda: all(count(handlers.warm_key(side)) > s.latency_warm for side in SIDES), 60,
                                  "the untimed warm-up streams", children, interval_s=0.1)  # fmt: skip
            say(f"  {s.latency} timed messages per side at {s.latency_rate:g}/s, in alternating blocks of "
                f"{LATENCY_BLOCK}")  # fmt: skip
            sent = dict.fromkeys(SIDES, 0)
            while any(n < s.latency for n in sent.values()):
                for side, topic in SIDES.items():
                    block = min(LATENCY_BLOCK, s.latency - sent[side])
                    if block <= 0:
                        continue
                    send_paced(producer, topic, side, block, s.latency_rate, warm=False)
                    sent[side] += block
                    # The block is done before the other side's starts, so the two never share the machine.
                    w.children.wait_until(arrived(side, sent[side]), 60, f"{side}: {sent[side]} handler starts",
                                          children, interval_s=0.05)  # fmt: skip
            rows = {side: redis_lines(w.redis, handlers.starts_key(side)) for side in SIDES}
    finally:
        producer.close(timeout=10)
    note, published = latency_split(w, rows["gpufleet"])
    w.notes.append(note)
    result = []
    for side in SIDES:
        cells = [r.split(",") for r in rows[side]]
        ms = [(float(started) - float(produced)) * 1000 for produced, started, _ in cells]
        if side == "naive":
            published = [(float(started) - float(sent)) * 1000 for _, started, sent in cells if sent]
        if not published:
            raise BenchError(f"{side}: no publish time read back for the latency rows")
        result.append(Latency(percentile(ms, 0.5), percentile(ms, 0.99), max(ms), percentile(published, 0.5),
                              percentile(published, 0.99)))  # fmt: skip
    return result[0], result[1]


def latency_split(w: World, rows: list[str]) -> tuple[str, list[float]]:
    """Where gpufleet's latency goes, read back from the registry records of the timed tasks; and each one's publish
    (created in Redis) -> handler start, in ms."""
    starts = {}
    for row in rows:
        produced, started, _ = row.split(",")
        starts[produced] = float(started)
    stages: dict[str, list[float]] = {"produced -> published": [], "published -> claimed": [],
                                      "claimed -> handler": []}  # fmt: skip
    for key in w.redis.scan_iter(f"{PREFIX}:task:*", count=1000):
        # A record written at creation has no queued_at: its created_at is that (see decode_record).
        stored, queued, created, claimed_at = w.redis.hmget(key, "event", "queued_at", "created_at", "started_at")
        queued_at = queued or created
        if not (stored and queued_at and claimed_at):
            continue
        event = orjson.loads(stored)
        handler_at = starts.get(repr(float(event["produced_ts"])))
        if event.get("warm") or handler_at is None:
            continue
        marks = [float(event["produced_ts"]), float(queued_at), float(claimed_at), handler_at]
        for values, a, b in zip(stages.values(), marks, marks[1:], strict=False):
            values.append((b - a) * 1000)
    parts = [f"{name} p50 {percentile(v, 0.5):.1f} / p99 {percentile(v, 0.99):.1f} ms"
             for name, v in stages.items() if v]  # fmt: skip
    published = [a + b for a, b in zip(stages["published -> claimed"], stages["claimed -> handler"], strict=True)]
    return "gpufleet latency by stage (registry timestamps): " + "; ".join(parts) + ".", published


def batch_both(w: World) -> tuple[batching.Figures, batching.Figures]:
    """The batching figures (see ``batching.py``): one gpufleet worker slot serves both functions."""
    w.flush()
    with w.children.session(w.gpu_worker()) as children:

        def wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
            w.children.wait_until(cond, timeout_s, what, children, interval_s=0.05)

        return batching.run_both(w.registry, w.fleet, w.sizes.batch, w.sizes.batch_paced, wait)


# --------------------------------------------------------------------------------------------------------------------
# The run and its table


@dataclass
class Row:
    figure: str
    ours: float | None
    base: float | None
    fmt: Callable[[float], str]
    target: str
    met: Callable[[float, float], bool] | None = None  # (gpufleet value, ratio) -> target met

    def cells(self) -> list[str]:
        ours = self.fmt(self.ours) if self.ours is not None else "error"
        base = self.fmt(self.base) if self.base is not None else "error"
        ratio = self.ours / self.base if self.ours is not None and self.base else None
        verdict = ""
        if self.met is not None and self.ours is not None and ratio is not None:
            verdict = " (met)" if self.met(self.ours, ratio) else " (missed)"
        elif self.met is not None:
            verdict = " (n/a)"
        return [self.figure, ours, base, f"{ratio:.2f}x" if ratio is not None else "n/a", self.target + verdict]


def duty_rows(pair: tuple[Duty, Duty] | None, kind: Kind, target: str, goal: float, gap_goal: float | None = None,
              spans: bool = False) -> list[Row]:  # fmt: skip
    """The rows of one more duty turn: duty (or, for GIL-holding handlers, throughput and the mean span) and its idle
    gap, against raw Celery's in the same turn."""
    ours, theirs = pair or (None, None)

    def get(d: Duty | None, attr: str) -> float | None:
        return None if d is None else float(getattr(d, attr))

    three, millis = (lambda v: f"{v:.3f}"), (lambda v: f"{v:.2f} ms")
    if spans:
        return [
            Row(f"Throughput, {kind.label}", get(ours, "tasks_per_s"), get(theirs, "tasks_per_s"),
                lambda v: f"{v:.1f} tasks/s", target, lambda _, r: r >= goal),
            Row(f"Mean task span, {kind.label}", get(ours, "task_ms"), get(theirs, "task_ms"), millis,
                "within 1 % of raw Celery", lambda _, r: abs(r - 1) <= 0.01),
            Row(f"Worker duty cycle, {kind.label}", get(ours, "duty"), get(theirs, "duty"), three, "reference"),
        ]  # fmt: skip
    return [
        Row(f"Worker duty cycle, {kind.label}", get(ours, "duty"), get(theirs, "duty"), three, target,
            lambda _, r: r >= goal),
        Row(f"Median idle gap, {kind.label}", get(ours, "gap_ms"), get(theirs, "gap_ms"), millis,
            f"<= {gap_goal:g} ms" if gap_goal else "lower is better",
            (lambda v, _: v <= gap_goal) if gap_goal else None),
    ]  # fmt: skip


def attempt(label: str, func: Callable[[], Any], errors: list[str]) -> Any:
    """Run one measurement; a failure is reported and leaves the figure empty, the other phases still run."""
    say(f"{label} ...")
    try:
        result = func()
    except Exception as exc:  # noqa: BLE001 - one failed phase must not hide the others' figures
        errors.append(f"{label}: {type(exc).__name__}: {str(exc)[:300]}")
        say(f"{label} FAILED: {type(exc).__name__}: {exc}")
        return None
    say(f"{label}: {result}")
    return result


def measure(w: World, errors: list[str], only: set[str]) -> list[Row]:
    n = w.sizes.ingest
    requested = set(only)

    def phase(name: str, label: str, func: Callable[[], Any]) -> Any:
        return attempt(label, func, errors) if name in only else None

    produced_ok = False
    keep_freed_memory()  # as a trigger process does; this process runs every in-process path (ingest), alike
    if only & {"ingest", "memory"}:
        small = w.sizes.small_ingest
        say(f"producing {n:,} messages to each of 3 ingest topics, {small:,} to the naive and memory topics")
        topics = {TOPICS[f"ingest-{path}"]: n for path in ("raw", "bridge", "gpufleet")}
        topics |= {TOPICS["ingest-naive"]: small, TOPICS["memory-gpufleet"]: small}
        produced_ok = attempt("produce", lambda: produce(w.bootstrap, topics), errors) is not None
    if not produced_ok:
        only = only - {"ingest", "memory"}
    raw_before = phase("ingest", "ingest: raw kafka-python consume, pass 1", lambda: ingest_raw(w, 1))
    # The bridge and gpufleet take turns, three times each, on fresh consumer groups: on a noisy VM one pass of
    # either has been seen anywhere from 0.7x to 1.3x of its mean.
    passes: dict[str, list[Ingested]] = {"bridge": [], "gpufleet": []}
    for turn in (1, 2, 3):
        for side, run_side in (("bridge", ingest_bridge), ("gpufleet", ingest_gpufleet)):
            label = f"ingest: {'minimal durable bridge' if side == 'bridge' else 'gpufleet KafkaTrigger'}, pass {turn}"
            got = phase("ingest", label, lambda run_side=run_side, turn=turn: run_side(w, turn))  # type: ignore[misc]
            if got is not None:
                passes[side].append(got)
    bridge, ours = (mean_rate(passes[side]) for side in ("bridge", "gpufleet"))
    if bridge and ours:
        pairs = list(zip(passes["bridge"], passes["gpufleet"], strict=False))
        ratios = [g.rate / b.rate for b, g in pairs]
        w.notes.append("Ingest passes (bridge / gpufleet, msg/s): " + ", ".join(
            f"{b.rate:,.0f} / {g.rate:,.0f}" for b, g in pairs) + f"; the table shows the means. Ratio per turn "
            f"{min(ratios):.2f}x-{max(ratios):.2f}x.")  # fmt: skip
    naive = phase("ingest", "ingest: naive bridge", lambda: ingest_naive(w))
    raw_after = phase("ingest", "ingest: raw kafka-python consume, pass 2", lambda: ingest_raw(w, 2))
    raw = raw_before
    if raw_before and raw_after:  # one pass before the others and one after: the mean evens out some drift
        raw = Ingested((raw_before.rate + raw_after.rate) / 2, (raw_before.seconds + raw_after.seconds) / 2)
        w.notes.append(f"Raw consume passes: {raw_before.rate:,.0f} msg/s (first) and {raw_after.rate:,.0f} msg/s "
                       "(last); the table shows their mean.")  # fmt: skip
    mem = phase("memory", "memory: gpufleet trigger process", lambda: memory_gpufleet(w))
    mem_naive = phase("memory", "memory: naive bridge process", lambda: memory_naive(w))
    none: tuple[None, None] = (None, None)
    lat, lat_naive = phase("latency", "latency: gpufleet / naive, alternating", lambda: latency_both(w)) or none
    duties: dict[str, tuple[Duty, Duty] | None] = {}
    for kind, n_tasks in ((SLEEP_20, w.sizes.duty), (SLEEP_100, w.sizes.duty // 3), (SPIN_20, w.sizes.duty)):
        label = f"duty cycle, {kind.label}: gpufleet / raw Celery, alternating"
        duties[kind.label] = phase("duty", label, lambda kind=kind, n_tasks=n_tasks: duty_both(w, kind, n_tasks))  # type: ignore[misc]
    duty, duty_celery = duties.get(SLEEP_20.label) or none
    if duty:
        w.notes.append(
            "gpufleet's idle gap is the pool process's own Python between two handlers: a helper thread claims "
            "the next task, and builds and writes the last outcome, while a handler runs (worker/ahead.py)."
        )
    batched, single = phase("batch", "batching: batched / unbatched, one worker", lambda: batch_both(w)) or none
    cpu, cpu_celery = phase("redis", "Redis CPU per task: gpufleet, then raw Celery",
                            lambda: redis_cpu_both(w, w.sizes.redis_tasks)) or none  # fmt: skip

    if mem and mem_naive:
        w.notes.append(f"Peak RSS (VmHWM): gpufleet trigger {mem[1]:.1f} MB, naive bridge {mem_naive[1]:.1f} MB. "
                       f"Process start to {w.sizes.small_ingest:,} published: gpufleet {mem[2]:.1f} s, naive "
                       f"{mem_naive[2]:.1f} s (both include process start and the Kafka group join).")  # fmt: skip
    if lat and lat_naive:
        w.notes.append(f"Latency max: gpufleet {lat.max_ms:.1f} ms, naive {lat_naive.max_ms:.1f} ms.")
    for label, pair in duties.items():
        if pair:
            w.notes.append(f"Duty turn {label}: mean task span {pair[0].task_ms:.2f} ms (gpufleet) / "
                           f"{pair[1].task_ms:.2f} ms (raw); throughput {pair[0].tasks_per_s:.1f} / "
                           f"{pair[1].tasks_per_s:.1f} tasks/s.")  # fmt: skip

    def rate(v: float) -> str:
        return f"{v:,.0f} msg/s"

    def millis(v: float) -> str:
        return f"{v:.1f} ms"

    def micros(v: float) -> str:
        return f"{v:.1f} µs"

    def get(obj: Any, attr: str | int) -> float | None:
        if obj is None:
            return None
        return float(obj[attr] if isinstance(attr, int) else getattr(obj, attr))

    ratio_met = {5.0: lambda _, r: r >= 5.0, 0.7: lambda _, r: r >= 0.7, 1.0: lambda _, r: r >= 1.0}
    rows = {
        "ingest": [
            Row("Trigger ingest rate vs naive bridge", get(ours, "rate"), get(naive, "rate"), rate, ">= 5x naive",
                ratio_met[5.0]),
            Row("Trigger ingest rate vs minimal durable bridge", get(ours, "rate"), get(bridge, "rate"), rate,
                ">= 0.7x bridge", ratio_met[0.7]),
            Row("Trigger ingest rate vs raw kafka-python consume", get(ours, "rate"), get(raw, "rate"), rate,
                "reference"),
        ],
        "latency": [
            Row("End-to-end latency p50 (produced -> handler start)", get(lat, "p50_ms"), get(lat_naive, "p50_ms"),
                millis, "lower is better"),
            Row("End-to-end latency p99", get(lat, "p99_ms"), get(lat_naive, "p99_ms"), millis, "lower is better"),
            Row("Publish -> handler start p50 (gpufleet: task created; naive: send_task)", get(lat, "pub_p50_ms"),
                get(lat_naive, "pub_p50_ms"), millis, "<= 0.7x naive", lambda _, r: r <= 0.7),
            Row("Publish -> handler start p99", get(lat, "pub_p99_ms"), get(lat_naive, "pub_p99_ms"), millis,
                "<= 1.0x naive", lambda _, r: r <= 1.0),
        ],
        "duty": [
            Row(f"Worker duty cycle, {w.sizes.task_ms:g} ms tasks, 1 worker", get(duty, "duty"),
                get(duty_celery, "duty"), lambda v: f"{v:.3f}", ">= 1.0x raw Celery", ratio_met[1.0]),
            Row("Worker duty cycle, absolute", get(duty, "duty"), get(duty_celery, "duty"), lambda v: f"{v:.3f}",
                ">= 0.98 (aim)", lambda v, _: v >= 0.98),
            Row("Median idle gap between consecutive tasks", get(duty, "gap_ms"), get(duty_celery, "gap_ms"),
                lambda v: f"{v:.2f} ms", "lower is better"),
            *duty_rows(duties.get(SLEEP_100.label), SLEEP_100, ">= 1.02x raw Celery", 1.02, gap_goal=0.5),
            *duty_rows(duties.get(SPIN_20.label), SPIN_20, ">= 1.05x raw Celery (throughput)", 1.05, spans=True),
        ],
        "batch": [
            Row("Batching: throughput, batch of 8 in 25 ms vs 20 ms each", get(batched, "throughput"),
                get(single, "throughput"), lambda v: f"{v:.0f} tasks/s", ">= 5x unbatched", ratio_met[5.0]),
            Row("Batching: latency p50 at low load (10/s), queued -> finished", get(batched, "p50_ms"),
                get(single, "p50_ms"), millis, "<= 2x unbatched", lambda _, r: r <= 2.0),
            Row("Batching: latency p99 at low load", get(batched, "p99_ms"), get(single, "p99_ms"), millis,
                "lower is better"),
            Row("Batching: latency p50 at 70 % load (35/s, random arrivals)", get(batched, "loaded_p50_ms"),
                get(single, "loaded_p50_ms"), millis, "<= 2x unbatched", lambda _, r: r <= 2.0),
            Row("Batching: latency p99 at 70 % load", get(batched, "loaded_p99_ms"), get(single, "loaded_p99_ms"),
                millis, "lower is better"),
            Row("Batching: events per call at 70 % load", get(batched, "mean_batch"), get(single, "mean_batch"),
                lambda v: f"{v:.2f}", "reference"),
        ],
        "redis": [
            Row("Redis CPU per empty task: enqueue + claim + finish", get(cpu, "total_us"),
                get(cpu_celery, "total_us"), micros, "<= 0.5x raw Celery", lambda _, r: r <= 0.5),
            Row("Redis CPU per task: enqueue", get(cpu, "enqueue_us"), get(cpu_celery, "enqueue_us"), micros,
                "lower is better"),
            Row("Redis CPU per task: claim + finish", get(cpu, "run_us"), get(cpu_celery, "run_us"), micros,
                "lower is better"),
            Row("Redis reads per task", get(cpu, "reads"), get(cpu_celery, "reads"), lambda v: f"{v:.1f}",
                "lower is better"),
        ],
        "memory": [
            Row(f"Trigger RSS after ingesting {w.sizes.small_ingest:,} messages", get(mem, 0), get(mem_naive, 0),
                lambda v: f"{v:.1f} MB", "< 150 MB", lambda v, _: v < 150),
        ],
    }  # fmt: skip
    return [row for name in ("ingest", "latency", "duty", "batch", "redis", "memory") if name in requested
            for row in rows[name]]  # fmt: skip


def render(rows: list[Row], sizes: Sizes, quick: bool, notes: list[str], errors: list[str]) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpus = os.cpu_count()
    lines = [
        f"## gpufleet benchmark ({'quick' if quick else 'full'}), {when}",
        "",
        f"Python {platform.python_version()}, {cpus} CPUs, {platform.system()} {platform.release()}. "
        f"Ingest: {sizes.ingest:,} messages of ~200 B per pass ({sizes.small_ingest:,} for the naive bridge and the "
        f"memory phase). Latency: {sizes.latency} timed messages at "
        f"{sizes.latency_rate:g}/s, 1 worker. Duty cycle: {sizes.duty} tasks of {sizes.task_ms:g} ms, 1 worker.",
        "",
        "| figure | gpufleet | baseline | ratio | target |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    lines += [
        "",
        "Baselines: ingest and memory: a naive bridge (kafka-python consumer, Celery `send_task` per message, "
        "commit per poll) and a bare kafka-python consumer; latency: the naive bridge feeding a raw Celery worker; "
        "duty cycle: a raw Celery worker (prefork, concurrency 1, acks_late, prefetch 1, JSON). Ratio = "
        "gpufleet / baseline.",
    ]
    if notes:
        lines += ["", "Notes:", *[f"- {note}" for note in notes]]
    if errors:
        lines += ["", "Errors:", *[f"- {e.splitlines()[0]}" for e in errors]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description="gpufleet benchmark; see bench/README.md")
    parser.add_argument("--quick", action="store_true", help="smaller workloads (under about 2 minutes)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (fleet, process logs)")
    parser.add_argument("--only", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    args = parser.parse_args()
    only = {p.strip() for p in args.only.split(",") if p.strip()}
    if not only <= set(PHASES):
        parser.error(f"--only: unknown phase(s) {sorted(only - set(PHASES))}; choose from {', '.join(PHASES)}")
    sizes = QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C, so the finally blocks below stop every process we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    configure_logging(LoggingSettings(level="warning", format="console"))  # in-process gpufleet logs, to stderr
    logging.getLogger("kafka").setLevel(logging.ERROR)  # kafka-python 3 warns about every slow loop turn on 2 cores

    workdir = Path(tempfile.mkdtemp(prefix="gpufleet-bench-"))
    services = LocalServices(workdir / "services")
    children = Children(workdir / "logs", {})
    errors: list[str] = []
    try:
        services.start()
        say(f"redis {services.redis_url}, kafka {services.kafka_bootstrap}, workdir {workdir}")
        create_topics(services.kafka_bootstrap)
        config = write_fleet(workdir, services.redis_url, services.kafka_bootstrap)
        fleet = load_fleet(config, env={})
        client = redis.Redis.from_url(services.redis_url, socket_timeout=30)
        (workdir / "logs").mkdir()
        children = Children(workdir / "logs", child_env(services.redis_url))
        world = World(sizes, workdir, services, config, fleet, client, Registry(client, PREFIX), children)
        rows = measure(world, errors, only)
        client.close()
    except BaseException:
        say(f"stopped by an error or signal; the temporary folder is kept: {workdir}")
        raise
    finally:
        children.stop_all()
        services.stop()
    report = render(rows, sizes, args.quick, world.notes, errors)
    print(report, end="", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    say(f"wrote {RESULTS}")
    if errors:
        say(f"{len(errors)} phase(s) failed; process logs kept in {workdir / 'logs'}")
        for error in errors:
            print(error, file=sys.stderr)
        return 1
    if args.keep:
        say(f"kept {workdir} (fleet config and process logs)")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
