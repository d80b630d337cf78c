"""``gpufleet dispatcher``: delivers callback records from the Redis stream to their destinations.

Workers never talk to Kafka: finishing a task appends its record to ``<prefix>:callbacks`` in the same atomic step
that sets its final state. Here a consumer group reads the stream, delivers each batch with retries and
exponential backoff, and acknowledges entries only after the destination acknowledged them. A dispatcher that
dies mid-batch leaves its entries pending; another claims them after ``dispatcher.claim_idle_s``.
At-least-once: a record may be delivered twice, and carries the task id (the Kafka key) to de-duplicate on.
A record a destination refuses for good is parked (see :mod:`gpufleet.parking`) and delivery goes on.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections import defaultdict

import orjson
import redis
import structlog

from gpufleet import redisconn
from gpufleet.credentials import redact_url
from gpufleet.destinations import open_destination
from gpufleet.destinations.base import Destination, OutRecord, Refusal
from gpufleet.errors import DeliveryError, GpufleetError, unreachable_hint
from gpufleet.parking import Parking
from gpufleet.registry import REDIS_ERRORS
from gpufleet.retry import retry_until
from gpufleet.settings import Fleet
from gpufleet.trace import HEADER

log = structlog.get_logger("gpufleet.dispatcher")
GROUP = "dispatchers"

Entry = tuple[bytes, dict[bytes, bytes]]


class Dispatcher:
    def __init__(self, fleet: Fleet, name: str | None = None) -> None:
        self.fleet = fleet
        s = fleet.settings
        self.client = redisconn.client(s.redis.url, socket_timeout=30, socket_connect_timeout=5)
        self.stream = f"{s.redis.key_prefix}:callbacks"
        self.name = name or f"{s.worker.hostname}-{os.getpid()}"
        self._destinations: dict[str, Destination] = {}
        self.parking = Parking(self.client, s.redis.key_prefix)
        self.delivered = 0
        self.parked = 0

    def _destination(self, url: str) -> Destination:
        dest = self._destinations.get(url)
        if dest is None:
            dest = self._destinations[url] = open_destination(url, self.fleet.settings)
        return dest

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def run(self, stop: threading.Event) -> None:
        hint = unreachable_hint("Redis", "redis.url", redact_url(self.fleet.settings.redis.url))
        if not retry_until(self._ensure_group, stop, "create the consumer group", 5.0, REDIS_ERRORS, hint):
            return
        log.info("dispatcher started", stream=self.stream, consumer=self.name)
        batch_max = self.fleet.settings.dispatcher.batch_max
        # Entries this consumer read before a restart come first ("0"), then new ones (">").
        cursor = "0"
        last_claim = 0.0
        try:
            while not stop.is_set():
                entries = self._read(cursor, batch_max)
                if cursor == "0" and not entries:
                    cursor = ">"
                    continue
                if time.monotonic() - last_claim > 5:
                    entries += self._claim_abandoned(batch_max)
                    last_claim = time.monotonic()
                if entries and not self._deliver(entries, stop):
                    break
            else:
                self._drain(batch_max)
        finally:
            for destination in self._destinations.values():
                destination.close()
            log.info("dispatcher stopped", delivered=self.delivered)

    def _drain(self, count: int, timeout_s: float = 10.0) -> None:
        """On a clean stop, deliver what is already in the stream (workers stop before us), for a bounded time."""
        deadline = threading.Event()
        timer = threading.Timer(timeout_s, deadline.set)
        timer.start()
        try:
            while not deadline.is_set():
                entries = self._read(">", count, block_ms=None)
                if not entries or not self._deliver(entries, deadline):
                    break
        finally:
            timer.cancel()

    def _settle(self, ids: list[bytes], url: str, parked: list[tuple[OutRecord, str]]) -> None:
        """Acknowledge delivered entries and park refused ones, in one transaction."""
        pipe = self.client.pipeline(transaction=True)
        for record, reason in parked:
            self.parking.park(pipe, url, record, reason)
        pipe.xack(self.stream, GROUP, *ids)
        pipe.xdel(self.stream, *ids)
        pipe.hincrby(f"{self.fleet.settings.redis.key_prefix}:m:delivered", "records", len(ids) - len(parked))
        pipe.execute()

    def _read(self, cursor: str, count: int, block_ms: int | None = 500) -> list[Entry]:
        try:
            reply = self.client.xreadgroup(GROUP, self.name, {self.stream: cursor}, count=count, block=block_ms)
        except REDIS_ERRORS as exc:
            log.warning("cannot read the callback stream; retrying", error=str(exc))
            time.sleep(1)
            return []
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("the callback stream's consumer group is gone (Redis lost its data?); creating it again")
            self._ensure_group()
            return []
        streams: list[tuple[bytes, list[Entry]]] = reply  # type: ignore[assignment]
        return [(eid, fields) for _, items in streams for eid, fields in items if fields]

    def _claim_abandoned(self, count: int) -> list[Entry]:
        idle_ms = int(self.fleet.settings.dispatcher.claim_idle_s * 1000)
        try:
            reply = self.client.xautoclaim(self.stream, GROUP, self.name, idle_ms, "0-0", count=count)
        except REDIS_ERRORS:
            return []
        claimed: list[Entry] = [(eid, fields) for eid, fields in reply[1] if fields]
        if claimed:
            log.warning("claimed records abandoned by another dispatcher", count=len(claimed))
        return claimed

    def _deliver(self, entries: list[Entry], stop: threading.Event) -> bool:
        """Deliver all entries, retrying with backoff; park what a destination refuses for good. False if stopped
        first (entries stay pending)."""
        by_dest: dict[str, list[tuple[bytes, OutRecord]]] = defaultdict(list)
        for eid, f in entries:
            by_dest[f.get(b"dest", b"").decode(errors="replace")].append((eid, _record(f)))
        s = self.fleet.settings.dispatcher
        for url, items in by_dest.items():
            delay = s.retry_backoff_s
            while True:
                try:
                    refused = self._destination(url).deliver([r for _, r in items])
                    break
                except DeliveryError as exc:
                    log.warning("delivery failed; retrying", destination=url, error=str(exc), retry_in_s=delay)
                    if stop.wait(delay):
                        return False
                    delay = min(s.retry_backoff_max_s, delay * 2)
                except GpufleetError as exc:  # a destination URL that is not valid (any more): nothing to retry
                    refused = [Refusal(i, f"bad destination: {exc}") for i in range(len(items))]
                    break
            ids = [eid for eid, _ in items]
            parked = [(items[r.index][1], r.reason) for r in refused]
            for record, reason in parked:
                log.error("destination refused a record for good; parked", destination=url, key=record.key,
                          reason=reason)  # fmt: skip
            # Delivered: acknowledge, even if Redis is away for a while (giving up would deliver them again).
            settle = functools.partial(self._settle, ids, url, parked)
            if not retry_until(settle, stop, "acknowledge delivered records", 5.0, REDIS_ERRORS):
                return False
            self.delivered += len(ids) - len(refused)
            self.parked += len(refused)
        return True


def _record(f: dict[bytes, bytes]) -> OutRecord:
    """A stream entry as a record: written by a worker's finish (condition, function) or re-sent from the parked
    stream (headers as JSON)."""
    if b"headers" in f:
        headers = orjson.loads(f[b"headers"])
    else:
        headers = {"condition": f.get(b"condition", b"").decode(), "function": f.get(b"function", b"").decode()}
        if f.get(b"traceparent"):
            headers[HEADER] = f[b"traceparent"].decode()
    return OutRecord(key=f.get(b"key", b"").decode(errors="replace"), value=f.get(b"value", b""), headers=headers)
