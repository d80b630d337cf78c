"""What the fleet looks like now, read from the registry in one round trip: for metrics, scaling and the dashboard.

Every figure lives in Redis, written by the role that knows it (the registry's scripts count tasks, waits and
durations in the same atomic step as each transition; supervisors publish their GPUs; triggers their lag;
dispatchers what they delivered). So any api process on any host reads the same, whole fleet: nothing is kept in
the memory of the process that serves it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import orjson

from gpufleet.delivery.flows import destinations
from gpufleet.registry import inventory
from gpufleet.registry.keyspace import HISTOGRAM_BOUNDS, US
from gpufleet.registry.model import State
from gpufleet.registry.store import Registry

LAG_STALE_S = 120.0  # a trigger that stopped reporting its lag: its figures are dropped, not kept frozen
QUEUE_HEAD = 10  # the first tasks of a queue whose age is read: the oldest is among them


@dataclass
class Histogram:
    buckets: list[int]  # per bucket (lua.HISTOGRAM_BOUNDS, then +Inf), not cumulative
    sum: float = 0.0


@dataclass
class QueueState:
    name: str
    depth: int = 0  # QUEUED tasks waiting in it
    oldest_age_s: float = 0.0
    running: int = 0


@dataclass
class Snapshot:
    at: float
    functions: list[str]
    counts: dict[tuple[str, str], int]  # (function, state) -> tasks in that state, while retained
    created: dict[str, int]
    finished: dict[tuple[str, str], int]  # (function, final state) -> counter
    wait: dict[str, Histogram]
    duration: dict[str, Histogram]
    cold: dict[str, Histogram]  # setup() runs after a pool process's boot: a task came for an unloaded function
    queues: dict[str, QueueState]
    gpus: list[dict[str, Any]]  # the inventory (Registry.gpus), with "ready"
    dead_letters: dict[tuple[str, str], int]  # (trigger, reason) -> counter
    overflows: dict[tuple[str, str, str], int]  # (function, first pool, pool placed in) -> counter
    callback_backlog: int
    callback_oldest_age_s: float
    callbacks_delivered: int
    parked: int
    trigger_lag: dict[str, dict[str, Any]]  # trigger -> {"kind", "values": {label: n}, "at"}
    destinations: list[dict[str, Any]] = field(default_factory=list)  # gpufleet.delivery.flows.destinations
    per_minute: list[tuple[int, int, int]] = field(default_factory=list)  # (minute start, ok, failed), last hour


def _split(raw: dict[bytes, bytes], parts: int = 2) -> dict[tuple[str, ...], bytes]:
    return {tuple(k.decode().split(US, parts - 1)): v for k, v in raw.items()}


def _histograms(raw: dict[bytes, bytes], n_buckets: int) -> dict[str, Histogram]:
    out: dict[str, Histogram] = defaultdict(lambda: Histogram([0] * n_buckets))
    for key, value in _split(raw).items():
        if len(key) != 2:
            continue
        fn, part = key
        if part == "sum":  # seconds, as a float: what releases before sum_us kept
            out[fn].sum += float(value)
        elif part == "sum_us":
            out[fn].sum += int(value) / 1e6
        elif part.isdigit() and 1 <= int(part) <= n_buckets:
            out[fn].buckets[int(part) - 1] = int(value)
    return dict(out)


def read(registry: Registry, functions: list[str], minutes: int = 0) -> Snapshot:
    """The fleet now; with ``minutes``, also finished tasks per minute over that many minutes (the chart)."""
    now = time.time()
    names = sorted(set(functions) | registry.functions_seen())
    queues = registry.queues()
    running = registry.running("worker", "started_at", "queue")
    held = inventory.running(registry, running)
    gpus = inventory.gpus(registry, seen_running=held)
    first_minute = int(now // 60) - minutes + 1
    replies = iter(_ask(registry, names, queues, range(first_minute, first_minute + minutes)))

    counts = {(fn, st.value): int(next(replies)) for fn in names for st in State}
    heads: dict[str, list[bytes]] = {}
    states: dict[str, QueueState] = {}
    for q in queues:
        states[q] = QueueState(q, depth=int(next(replies)))
        heads[q] = next(replies)
    created_raw, finished_raw, wait_raw, duration_raw, cold_raw, dead_raw, lag_raw, delivered_raw, overflow_raw = (
        next(replies) for _ in range(9)
    )
    ready_raw = next(replies)
    backlog, oldest, parked = int(next(replies)), next(replies), int(next(replies))
    runs = {tasks[0] for tasks in held.values()}  # what the workers run; not a task one claimed ahead
    for task_id, (_, _, queue) in running:
        if queue is not None and task_id in runs:
            states.setdefault(queue.decode(), QueueState(queue.decode())).running += 1
    per_minute = [
        (60 * (first_minute + i), int(ok or 0), int(failed or 0))
        for i, (ok, failed) in enumerate(next(replies) for _ in range(minutes))
    ]

    _oldest_ages(registry, heads, states, now)
    _mark_ready(gpus, ready_raw)
    n_buckets = len(HISTOGRAM_BOUNDS) + 1
    # Records wait in the callback stream only until routed, then in their destination's flow.
    flows = destinations(registry.client, registry.prefix, now)
    oldest_s = max([now - int(oldest[0][0].split(b"-")[0]) / 1000 if oldest else 0.0] + [f["lag_s"] for f in flows])
    return Snapshot(
        at=now,
        functions=names,
        counts=counts,
        created={k.decode(): int(v) for k, v in created_raw.items()},
        finished={(k[0], k[1]): int(v) for k, v in _split(finished_raw).items() if len(k) == 2},
        wait=_histograms(wait_raw, n_buckets),
        duration=_histograms(duration_raw, n_buckets),
        cold=_histograms(cold_raw, n_buckets),
        queues=states,
        gpus=gpus,
        dead_letters={(k[0], k[1]): int(v) for k, v in _split(dead_raw).items() if len(k) == 2},
        overflows={(k[0], k[1], k[2]): int(v) for k, v in _split(overflow_raw, 3).items() if len(k) == 3},
        callback_backlog=backlog + sum(f["backlog"] for f in flows),
        callback_oldest_age_s=max(0.0, oldest_s),
        destinations=flows,
        callbacks_delivered=int(delivered_raw.get(b"records", 0)),
        parked=parked,
        trigger_lag=_fresh_lag(lag_raw, now),
        per_minute=per_minute,
    )


def _ask(registry: Registry, names: list[str], queues: list[str], minutes: range) -> list[Any]:
    """What :func:`read` reads, in one round trip, in this order."""
    keys, pipe = registry.keys, registry.client.pipeline(transaction=False)
    for fn in names:
        for state in State:
            pipe.zcard(keys.index(fn, state))
    for q in queues:
        pipe.zcard(keys.pending(q))
        pipe.zrange(keys.pending(q), 0, QUEUE_HEAD - 1)
    for name in ("created", "finished", "wait", "duration", "cold", "dead", "trigger_lag", "delivered", "overflow"):
        pipe.hgetall(keys.metric(name))
    pipe.hgetall(keys.ready)
    pipe.xlen(keys.callbacks)
    pipe.xrange(keys.callbacks, "-", "+", count=1)
    pipe.xlen(keys.parked)
    for minute in minutes:
        pipe.hmget(keys.minute(minute), "ok", "failed")
    return pipe.execute()


def _oldest_ages(registry: Registry, heads: dict[str, list[bytes]], states: dict[str, QueueState], now: float) -> None:
    """Each queue's oldest waiting task's age: its queued_at, among the first few (the head is usually the oldest)."""
    pipe = registry.client.pipeline(transaction=False)
    for ids in heads.values():
        for raw_id in ids:
            pipe.hmget(registry.keys.task(raw_id.decode()), "queued_at", "created_at")  # see decode_record
    stamps = iter(pipe.execute())
    for q, ids in heads.items():
        queued = [float(q_at or c_at) for q_at, c_at in (next(stamps) for _ in ids) if q_at or c_at]
        states[q].oldest_age_s = max(0.0, now - min(queued)) if queued else 0.0


def _mark_ready(gpus: list[dict[str, Any]], ready_raw: dict[bytes, bytes]) -> None:
    """Ready: the pool process of the worker's current process has booted (setup() done) and takes tasks."""
    ready = {k.decode(): v.decode() for k, v in ready_raw.items()}
    for entry in gpus:
        live = entry.get("up") and not entry["stale"]
        entry["ready"] = bool(live and ready.get(entry["worker"]) == str(entry["pid"]))


def _fresh_lag(lag_raw: dict[bytes, bytes], now: float) -> dict[str, Any]:
    """Each trigger's last lag report, unless it stopped reporting (then its figures are dropped, not kept frozen)."""
    lag = {}
    for trigger, value in lag_raw.items():
        report = orjson.loads(value)
        if now - float(report.get("at", 0)) <= LAG_STALE_S:
            lag[trigger.decode()] = report
    return lag


RECENT_DEAD = 200  # dead letters the dashboard can list (their reasons and sources, not their bytes)


def record_dead_letters(registry: Registry, trigger: str, letters: list[dict[str, str]]) -> None:
    """Count dead letters once delivered (``gpufleet_dead_letters_total``), and keep the latest few's headers."""
    pipe = registry.client.pipeline(transaction=False)
    now = repr(time.time())
    for headers in letters:
        pipe.hincrby(registry.keys.metric("dead"), f"{trigger}{US}{headers.get('reason', '')}", 1)
        entry: dict[Any, Any] = {k: headers.get(k, "")[:500] for k in ("reason", "detail", "source")}
        pipe.xadd(
            registry.keys.metric("dead_recent"),
            {**entry, "trigger": trigger, "at": now},
            maxlen=RECENT_DEAD,
            approximate=True,
        )
    pipe.execute()


def recent_dead_letters(registry: Registry, limit: int) -> list[dict[str, Any]]:
    """The latest dead letters, newest first: trigger, reason, detail, source and when."""
    rows: list[tuple[bytes, dict[bytes, bytes]]] = registry.client.xrevrange(  # type: ignore[assignment]
        registry.keys.metric("dead_recent"), count=limit
    )
    return [
        {**{k.decode(): v.decode(errors="replace") for k, v in f.items()}, "at": float(f.get(b"at", b"0"))}
        for _, f in rows
    ]


def report_lag(registry: Registry, trigger: str, kind: str, values: dict[str, int]) -> None:
    """A trigger's backlog at its source: ``kind`` ``partition`` (Kafka consumer lag per partition) or ``depth``
    (messages waiting at a queue: SQS's approximate count, AMQP's ready and unacknowledged ones)."""
    report = {"kind": kind, "values": values, "at": time.time()}
    registry.client.hset(registry.keys.metric("trigger_lag"), trigger, orjson.dumps(report))
