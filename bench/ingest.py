"""Phase 1 and 4 of ``run.py``: the trigger ingest rate (gpufleet against the minimal durable bridge, the naive
bridge and raw kafka-python consumption) and the trigger process's resident memory after the same workload."""

from __future__ import annotations

import base64
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

import naive_bridge
from gpufleet.config import Fleet
from gpufleet.registry.messages import MessageFactory, priority_list, queue_name
from gpufleet.triggers.ingest import Prepared
from gpufleet.triggers.kafka import KafkaSettings, KafkaTrigger
from world import PREFIX, TOPICS, BenchError, World, queued_messages

# --------------------------------------------------------------------------------------------------------------------
# 1. Ingest rate


@dataclass
class Ingested:
    rate: float  # messages per second, from the first polled record to the last one handled
    seconds: float


def mean_rate(passes: list[Ingested]) -> Ingested | None:
    if not passes:
        return None
    seconds = sum(p.seconds for p in passes) / len(passes)
    return Ingested(sum(p.rate for p in passes) / len(passes), seconds)


def ingest_raw(w: World, attempt: int) -> Ingested:
    n = w.sizes.ingest
    consumer = naive_bridge.bench_consumer(w.bootstrap, TOPICS["ingest-raw"], f"bench-ingest-raw-{attempt}")
    try:
        seen, first = 0, None
        deadline = time.monotonic() + 120
        while seen < n:
            if time.monotonic() > deadline:
                raise BenchError(f"raw consumer read {seen}/{n} messages in 120 s")
            polled = consumer.poll(timeout_ms=200)
            if polled and first is None:
                first = time.perf_counter()
            seen += sum(len(records) for records in polled.values())
        last = time.perf_counter()
    finally:
        consumer.close(autocommit=False)
    assert first is not None
    return Ingested(n / (last - first), last - first)


BRIDGE_COMMIT_S = 0.25  # the Kafka trigger's default commit_interval_ms


def ingest_bridge(w: World, attempt: int) -> Ingested:
    """The least a durable Kafka -> Celery bridge can do: per poll, one pipelined LPUSH of envelopes built by string
    formatting from one prebuilt template (no parsing, no checks, no registry); a commit every 250 ms, as gpufleet's
    trigger commits by default (``commit_interval_ms``), and one after the last push. Nothing is lost (a commit
    follows the pushes it covers), but nothing is de-duplicated, validated or tracked either."""
    n = w.sizes.ingest
    w.flush()
    factory = MessageFactory(PREFIX, w.fleet.settings.worker.kill_grace_s)
    envelope = orjson.loads(factory.build("@ID@", w.fleet.functions["noop"], {}, {}).envelope)
    envelope["body"], envelope["properties"]["body_encoding"] = "@BODY@", "base64"  # Celery's own body format
    template = orjson.dumps(envelope).decode()
    queue = priority_list(queue_name(PREFIX, "default", "any", "bridge"), 4)
    consumer = naive_bridge.bench_consumer(w.bootstrap, TOPICS["ingest-bridge"], f"bench-ingest-bridge-{attempt}")
    try:
        seen, first, committed = 0, None, time.monotonic()
        deadline = time.monotonic() + 120
        while seen < n:
            if time.monotonic() > deadline:
                raise BenchError(f"minimal bridge pushed {seen}/{n} messages in 120 s")
            polled = consumer.poll(timeout_ms=200)
            if not polled:
                continue
            if first is None:
                first = time.perf_counter()
            pipe = w.redis.pipeline(transaction=False)
            for records in polled.values():
                envelopes = [template.replace("@ID@", f"bridge-{r.partition}-{r.offset}").replace("@BODY@",
                             base64.b64encode(b'[[],{"function":"noop","event":' + r.value + b',"meta":{}},'
                                              b'{"callbacks":null,"errbacks":null,"chain":null,"chord":null}]').decode())
                             for r in records]  # fmt: skip
                pipe.lpush(queue, *envelopes)
                seen += len(records)
            pipe.execute()
            if time.monotonic() - committed >= BRIDGE_COMMIT_S:
                consumer.commit()
                committed = time.monotonic()
        consumer.commit()  # what the last pushes hold
        last = time.perf_counter()
    finally:
        consumer.close(autocommit=False)
    if int(w.redis.llen(queue)) != n:
        raise BenchError(f"minimal bridge: {w.redis.llen(queue)} messages in its queue, expected {n}")
    assert first is not None
    return Ingested(n / (last - first), last - first)


def ingest_naive(w: World) -> Ingested:
    n = w.sizes.small_ingest
    w.flush()
    app = naive_bridge.plain_celery(w.redis_url)
    consumer = naive_bridge.bench_consumer(w.bootstrap, TOPICS["ingest-naive"], "bench-ingest-naive")
    stop = threading.Event()
    watchdog = threading.Timer(240, stop.set)
    timing = naive_bridge.BridgeTiming(target=n)
    watchdog.start()
    try:
        naive_bridge.run_bridge(consumer, app, naive_bridge.route_gpufleet, stop, timing)
    finally:
        watchdog.cancel()
        consumer.close(autocommit=False)
        app.close()
    if timing.done is None or timing.first is None:
        raise BenchError(f"naive bridge published {timing.seen}/{n} messages in 240 s")
    queued = queued_messages(w, "noop")
    if queued != n:
        raise BenchError(f"naive bridge: the noop queue holds {queued} messages, expected {n}")
    return Ingested(n / (timing.done - timing.first), timing.done - timing.first)


class _TimedConsumer:
    """Wraps the trigger's KafkaConsumer: when the first record came, and when the commit covering N returned."""

    def __init__(self, inner: Any, target: int, published: Callable[[], int]) -> None:
        self.inner = inner
        self.target = target
        self.published = published  # tasks the trigger published so far (duplicates not counted)
        self.seen = 0
        self.first: float | None = None
        self.done_at: float | None = None
        self.done = threading.Event()
        self.poll_s = 0.0
        self.commit_s = 0.0

    def __getattr__(self, name: str) -> Any:  # what the trigger uses besides poll and commit (its lag report)
        return getattr(self.inner, name)

    def poll(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        polled = self.inner.poll(*args, **kwargs)
        if polled:
            if self.first is None:
                self.first = time.perf_counter()
            else:
                self.poll_s += time.perf_counter() - started
            self.seen += sum(len(records) for records in polled.values())
        return polled

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = self.inner.commit(*args, **kwargs)
        self.commit_s += time.perf_counter() - started
        if self.published() >= self.target and self.done_at is None:
            self.done_at = time.perf_counter()
            self.done.set()
        return result

    def close(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.close(*args, **kwargs)


class TimedKafkaTrigger(KafkaTrigger):
    """gpufleet's KafkaTrigger, unchanged, with its consumer, parse and publish calls timed."""

    def __init__(self, fleet: Fleet, trigger: KafkaSettings, target: int) -> None:
        super().__init__(fleet, trigger)
        self.target = target
        self.timed: _TimedConsumer | None = None
        self.parse_s = 0.0
        self.send_s = 0.0  # on the trigger's thread: packing and sending a batch's scripts
        self.wait_s = 0.0  # reading Redis's answers (waiting for them, if Redis is not done yet), and settling
        # Timed per batch, not per message: a timer around each message's parse would cost the trigger ~2 %.
        prepare, send, complete = self.ingest.prepare, self.ingest.send, self.ingest.complete

        def timed_prepare(messages: list[Any]) -> Prepared:
            started = time.perf_counter()
            try:
                return prepare(messages)
            finally:
                self.parse_s += time.perf_counter() - started

        def timed_send(batch: Prepared) -> Any:
            started = time.perf_counter()
            try:
                return send(batch)
            finally:
                self.send_s += time.perf_counter() - started

        def timed_complete(batch: Prepared, sent: Any, stop: threading.Event) -> Any:
            started = time.perf_counter()
            try:
                return complete(batch, sent, stop)
            finally:
                self.wait_s += time.perf_counter() - started

        self.ingest.prepare = timed_prepare  # type: ignore[method-assign]
        self.ingest.send = timed_send  # type: ignore[method-assign]
        self.ingest.complete = timed_complete  # type: ignore[method-assign]

    def _consumer(self) -> Any:
        self.timed = _TimedConsumer(super()._consumer(), self.target, lambda: self.stats["published"])
        return self.timed


def ingest_gpufleet(w: World, attempt: int) -> Ingested:
    n = w.sizes.ingest
    w.flush()
    configured = w.fleet.triggers["ingest"].model_dump()
    settings = KafkaSettings.model_validate(
        {**configured, "group": f"{configured['group']}-{attempt}"}
    )  # from the start
    trigger = TimedKafkaTrigger(w.fleet, settings, target=n)
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            trigger.run(stop)
        except BaseException as exc:
            failure.append(exc)
            raise

    thread = threading.Thread(target=run, name="bench-trigger", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 240
        while not (trigger.timed and trigger.timed.done.wait(0.1)):
            if failure or not thread.is_alive():
                raise BenchError(f"the trigger thread stopped: {failure[0] if failure else 'no error'}")
            if time.monotonic() > deadline:
                raise BenchError(f"trigger published {trigger.stats['published']}/{n} messages in 240 s")
    finally:
        stop.set()
        thread.join(timeout=30)
    timed = trigger.timed
    assert timed is not None
    assert timed.first is not None
    assert timed.done_at is not None
    counted = w.registry.counts("noop").get("QUEUED", 0)
    queued = queued_messages(w, "noop")
    if counted != n or queued != n:
        raise BenchError(f"gpufleet: registry counts QUEUED={counted}, the noop queue holds {queued}; expected {n}")
    seconds = timed.done_at - timed.first

    def per_msg(s: float) -> str:
        return f"{s / n * 1e6:.0f} us/msg"

    w.notes.append(
        f"Trigger time by step (pass {attempt}, in-process, {seconds:.2f} s after the first record; one thread, and "
        f"Redis runs a batch's scripts while the next is polled and parsed): Kafka poll {timed.poll_s:.2f} s, parse + "
        f"build {trigger.parse_s:.2f} s ({per_msg(trigger.parse_s)}), sending to Redis {trigger.send_s:.2f} s "
        f"({per_msg(trigger.send_s)}), Redis's answers {trigger.wait_s:.2f} s ({per_msg(trigger.wait_s)}), commit "
        f"{timed.commit_s:.2f} s; {timed.seen:,} records polled, {trigger.stats['duplicates']} duplicates."
    )
    return Ingested(n / seconds, seconds)


# --------------------------------------------------------------------------------------------------------------------
# 4. Resident memory of the trigger process after the ingest workload


def rss_after_ingest(w: World, spec: tuple[str, list[str]], done: Callable[[], bool]) -> tuple[float, float, float]:
    """Start the process, wait until ``done``, and return (RSS MB, peak RSS MB, seconds from start to done)."""
    w.flush()
    with w.children.session(spec) as (child,):
        started = time.perf_counter()
        finished = w.children.wait_until(done, 240, f"{child.name} to ingest {w.sizes.small_ingest} messages", [child],
                                         interval_s=0.1)  # fmt: skip
        time.sleep(1.0)  # let the last commit land and the process settle
        proc = psutil.Process(child.proc.pid)
        rss = proc.memory_info().rss / 2**20
        peak = rss
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) / 1024
    return rss, peak, finished - started


def memory_gpufleet(w: World) -> tuple[float, float, float]:
    n = w.sizes.small_ingest
    return rss_after_ingest(w, w.trigger_cli("memory"), lambda: w.registry.counts("noop").get("QUEUED", 0) >= n)


def memory_naive(w: World) -> tuple[float, float, float]:
    n = w.sizes.small_ingest
    spec = w.naive_cli(TOPICS["ingest-naive"], "bench-memory-naive", "gpufleet")
    return rss_after_ingest(w, spec, lambda: queued_messages(w, "noop") >= n)
