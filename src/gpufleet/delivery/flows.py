"""Delivery flows: each destination's records wait and go out on their own, so a destination that is down, slow or
refusing holds back only its own records.

The dispatcher moves each record of the callback stream (``<prefix>:callbacks``, which workers write in the same
atomic step as a task's final state) into its destination's flow: the stream ``<prefix>:flow:<id>``, ``id`` being a
hash of the destination URL (``<prefix>:flows`` maps ids to URLs). One script moves a batch, and moves an entry once
however often it runs (``route.lua``).

One dispatcher at a time delivers a flow: the holder of its lease (``<prefix>:flow:<id>:lease``, a process token
that lapses after ``dispatcher.claim_idle_s``, or at once when a dispatcher on the same host finds its holder dead).
It reads the flow oldest first, so a destination gets a task's records in the order they were written. Each flow has

- its backlog (the stream's length) and lag (the age of its oldest record, from when the worker wrote it);
- its backoff: a batch that failed is sent again after ``retry_backoff_s``, doubling up to ``retry_backoff_max_s``;
- its circuit breaker: after ``breaker_failures`` failures in a row it sends one record at a time, every
  ``retry_backoff_max_s``, until one passes; a dead endpoint is not sent whole batches;
- its parking: a record the destination refuses for good, or that waited longer than ``max_delivery_age_s``, or was
  tried ``max_delivery_attempts`` times, is parked with the reason (:mod:`gpufleet.delivery.parking`). A batch refused
  whole (an SQS request with one bad entry) is split until the record at fault is parked alone.

Its state (``<prefix>:flow:<id>:state``) is what ``gpufleet_destination_*`` metrics and the API show.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import structlog

from gpufleet.credentials import redact, redact_url
from gpufleet.delivery.parking import Parking
from gpufleet.destinations import open_destination
from gpufleet.destinations.base import Destination, OutRecord, Refusal
from gpufleet.errors import DeliveryError, GpufleetError
from gpufleet.registry.keyspace import Keyspace, script, stream_entry
from gpufleet.registry.model import REDIS_ERRORS
from gpufleet.worker.lease import owner_is_dead

if TYPE_CHECKING:
    from gpufleet.config import Fleet

log = structlog.get_logger("gpufleet.delivery.dispatcher")
Entry = tuple[bytes, dict[bytes, bytes]]
IDLE_RETIRE_S = 300.0  # a flow empty this long is forgotten (its thread ends) until its destination gets a record


def flow_id(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


class Lease:
    """A lease on one key, held by this process's token."""

    def __init__(self, client: redis.Redis, key: str, token: str, host: str, ttl_s: float) -> None:
        self.client, self.key, self.token, self.host = client, key, token, host
        self.ttl_ms = max(1000, int(ttl_s * 1000))
        self.held = False
        self._lock = threading.Lock()  # the flow's thread takes and releases; the dispatcher's keeper renews

    def take(self) -> bool:
        """Take or renew; False while another live process holds it."""
        with self._lock:
            holder: Any = self.client.get(self.key)
            # Another process's token: on this host, is it still alive? (Never asked of our own, on every loop.)
            theirs = holder.decode() if holder and holder != self.token.encode() else ""
            dead = theirs if theirs and owner_is_dead(theirs, self.host) else ""
            self.held = bool(self.client.eval(script("lease_take"), 1, self.key, self.token, self.ttl_ms, dead))
            return self.held

    def renew(self) -> None:
        with self._lock:
            if self.held:
                self.held = bool(self.client.eval(script("lease_take"), 1, self.key, self.token, self.ttl_ms, ""))

    def release(self) -> None:
        with self._lock:
            if self.held:
                self.held = False
                self.client.eval(script("lease_release"), 1, self.key, self.token)


@dataclass
class FlowState:
    failures: int = 0  # in a row
    open: bool = False  # the breaker: one record at a time until one passes
    error: str = ""
    since: float = 0.0  # failing since (unix time)


class Flow:
    """One destination's records: delivered by this process while it holds the flow's lease."""

    def __init__(self, fleet: Fleet, client: redis.Redis, fid: str, url: str, token: str) -> None:
        s = fleet.settings
        self.fleet, self.client, self.fid, self.url = fleet, client, fid, url
        self.shown = redact_url(url)
        self.keys = Keyspace(s.redis.key_prefix)
        self.key = self.keys.flow(fid)
        self.lease = Lease(client, self.keys.flow_lease(fid), token, s.worker.hostname, s.dispatcher.claim_idle_s)
        self.parking = Parking(client, s.redis.key_prefix)
        self.state = FlowState()
        self.attempts: dict[bytes, int] = {}  # failed tries per entry id, for max_delivery_attempts
        self.stop = threading.Event()  # this flow only: retired, or the dispatcher is done draining
        self.delivered = self.parked = 0
        self._destination: Destination | None = None
        self._idle_since = time.monotonic()

    # -- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    if not self.lease.take():
                        self.stop.wait(1.0)
                        continue
                    entries = self._read()
                    if not entries:
                        if time.monotonic() - self._idle_since > IDLE_RETIRE_S and self._retire():
                            return
                        continue
                    self._idle_since = time.monotonic()
                    self._deliver(entries)
                except REDIS_ERRORS as exc:
                    log.warning(
                        "cannot reach Redis for a delivery flow; retrying",
                        destination=self.shown,
                        error=redact(str(exc)),
                    )
                    self.stop.wait(1.0)
                except Exception as exc:  # noqa: BLE001 - a client failed in a way it should not: its flow waits
                    log.error(
                        "delivery flow failed unexpectedly; retrying",
                        destination=self.shown,
                        error=f"{type(exc).__name__}: {redact(str(exc))}",
                    )
                    self.stop.wait(self.fleet.settings.dispatcher.retry_backoff_max_s)
        finally:
            if self._destination is not None:
                self._destination.close()
            with contextlib.suppress(*REDIS_ERRORS):  # it lapses
                self.lease.release()

    def backlog(self) -> int:
        return int(self.client.xlen(self.key))

    def _read(self) -> list[Entry]:
        batch_max = 1 if self.state.open else self.fleet.settings.dispatcher.batch_max
        reply: Any = self.client.xread({self.key: "0-0"}, count=batch_max, block=500)
        return [(eid, f) for _, items in reply or [] for eid, f in items if f]

    def _retire(self) -> bool:
        keys = (self.lease.key, self.key, self.keys.flows)
        return bool(self.client.eval(script("flow_retire"), len(keys), *keys, self.lease.token, self.fid))

    # -- one batch ---------------------------------------------------------------------------------------------

    def _deliver(self, entries: list[Entry]) -> None:
        read = [(entry, record_of(entry[1])) for entry in entries]  # each entry decoded once
        unreadable = [entry for entry, record in read if record is None]
        if unreadable:  # written by something else than gpufleet: parked, never looping
            broken = [
                (OutRecord(f.get(b"key", b"").decode(errors="replace"), f.get(b"value", b"")), "unreadable")
                for _, f in unreadable
            ]
            self._settle([eid for eid, _ in unreadable], broken)
        entries = [entry for entry, record in read if record is not None]
        records = [record for _, record in read if record is not None]
        if not entries:
            return
        try:
            refused = self._send(records)
        except DeliveryError as exc:
            self._failed(entries, records, redact(str(exc)))
            return
        ids = [eid for eid, _ in entries]
        parked = [(records[r.index], r.reason) for r in refused]
        for record, reason in parked:
            log.error(
                "destination refused a record for good; parked",
                destination=self.shown,
                key=record.key,
                reason=redact(reason),
            )
        if self._settle(ids, parked):
            self.delivered += len(ids) - len(parked)
            self.parked += len(parked)
        for eid in ids:
            self.attempts.pop(eid, None)
        if self.state.failures:
            log.info("destination delivers again", destination=self.shown, after_failures=self.state.failures)
            self._publish(FlowState())

    def _send(self, records: list[OutRecord]) -> list[Refusal]:
        """Deliver, splitting a batch refused whole with one reason: the record at fault is found and parked alone."""
        try:
            refused = self._open().deliver(records)
        except GpufleetError as exc:
            if isinstance(exc, DeliveryError):
                raise
            refused = [Refusal(i, f"bad destination: {exc}") for i in range(len(records))]  # nothing to retry
        if len(records) > 1 and len(refused) == len(records) and len({r.reason for r in refused}) == 1:
            half = len(records) // 2
            right = self._send(records[half:])
            return self._send(records[:half]) + [Refusal(r.index + half, r.reason) for r in right]
        return refused

    def _failed(self, entries: list[Entry], records: list[OutRecord], error: str) -> None:
        d = self.fleet.settings.dispatcher
        now = time.time()
        expired: list[tuple[bytes, OutRecord, str]] = []
        for (eid, f), record in zip(entries, records, strict=True):
            self.attempts[eid] = tries = self.attempts.get(eid, 0) + 1
            age = now - int(f.get(b"at", b"0") or 0) / 1000
            if age > d.max_delivery_age_s:
                expired.append((eid, record, f"undelivered after {age:.0f} s (max_delivery_age_s): {error}"))
            elif d.max_delivery_attempts is not None and tries >= d.max_delivery_attempts:
                expired.append((eid, record, f"undelivered after {tries} tries (max_delivery_attempts): {error}"))
        if expired:
            log.error(
                "records waited too long for their destination; parked",
                destination=self.shown,
                count=len(expired),
                error=error,
            )
            if self._settle([eid for eid, _, _ in expired], [(r, why) for _, r, why in expired]):
                self.parked += len(expired)
            for eid, _, _ in expired:
                self.attempts.pop(eid, None)
        failures = self.state.failures + 1
        delay = min(d.retry_backoff_max_s, d.retry_backoff_s * 2 ** min(failures - 1, 30))
        opened = failures >= d.breaker_failures
        log.warning(
            "delivery failed; retrying",
            destination=self.shown,
            error=error,
            retry_in_s=delay,
            failures=failures,
            breaker="open" if opened else "closed",
        )
        self._publish(FlowState(failures, opened, error, self.state.since or now))
        self.stop.wait(delay)

    def _settle(self, ids: list[bytes], parked: list[tuple[OutRecord, str]]) -> bool:
        """Remove delivered (and park refused) entries, only while we hold the lease: a holder that lost it (frozen
        past it) leaves them to the new one, which sends them again (at-least-once)."""
        for _ in range(5):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.lease.key)  # type: ignore[no-untyped-call]
                    if pipe.get(self.lease.key) != self.lease.token.encode():
                        return False
                    pipe.multi()
                    for record, reason in parked:
                        self.parking.park(pipe, self.url, record, reason)
                    pipe.xdel(self.key, *ids)
                    pipe.hincrby(self.keys.metric("delivered"), "records", len(ids) - len(parked))
                    pipe.hincrby(self.keys.metric("delivered"), self.fid, len(ids) - len(parked))
                    if parked:
                        pipe.hincrby(self.keys.metric("parked"), self.fid, len(parked))
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue  # our own renewal touched the lease
        return False

    def _publish(self, state: FlowState) -> None:
        self.state = state
        fields = {
            "url": self.shown,
            "failures": state.failures,
            "breaker": "open" if state.open else "closed",
            "error": state.error[:500],
            "failing_since": state.since,
            "holder": self.lease.token,
        }
        self.client.hset(self.keys.flow_state(self.fid), mapping=fields)  # type: ignore[arg-type]

    def _open(self) -> Destination:
        if self._destination is None:
            self._destination = open_destination(self.url, self.fleet.settings)
        return self._destination


def record_of(f: dict[bytes, bytes]) -> OutRecord | None:
    """A stream entry as a record: written by a worker's finish or re-sent from the parked stream; None if its
    headers cannot be read."""
    entry = stream_entry(f)
    return None if entry.headers is None else OutRecord(key=entry.key, value=entry.value, headers=entry.headers)


def destinations(client: redis.Redis, prefix: str, now: float) -> list[dict[str, Any]]:
    """Each destination's flow as metrics and the API show it: backlog, lag, delivered, parked, breaker, last error
    (URLs and errors with their secrets masked)."""
    keys = Keyspace(prefix)
    raw: Any = client.hgetall(keys.flows)
    flows = sorted((k.decode(), v.decode()) for k, v in raw.items())
    pipe = client.pipeline(transaction=False)
    for fid, _ in flows:
        pipe.xlen(keys.flow(fid))
        pipe.xrange(keys.flow(fid), "-", "+", count=1)
        pipe.hgetall(keys.flow_state(fid))
    pipe.hgetall(keys.metric("delivered"))
    pipe.hgetall(keys.metric("parked"))
    replies = pipe.execute()
    delivered, parked = replies[-2], replies[-1]
    out = []
    for i, (fid, url) in enumerate(flows):
        backlog, head, state = replies[3 * i : 3 * i + 3]
        at = int(head[0][1].get(b"at", b"0") or 0) / 1000 if head else now
        out.append(
            {
                "destination": redact_url(url),
                "backlog": int(backlog),
                "lag_s": max(0.0, now - at),
                "delivered": int(delivered.get(fid.encode(), 0)),
                "parked": int(parked.get(fid.encode(), 0)),
                "breaker": state.get(b"breaker", b"closed").decode(),
                "failures": int(state.get(b"failures", 0)),
                "error": state.get(b"error", b"").decode() if int(state.get(b"failures", 0)) else "",
            }
        )
    return out
