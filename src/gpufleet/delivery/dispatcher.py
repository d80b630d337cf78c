"""``gpufleet dispatcher``: delivers callback records from the Redis stream to their destinations.

Workers never talk to a destination: finishing a task appends its record to ``<prefix>:callbacks`` in the same atomic
step that sets its final state. A dispatcher reads that stream (a consumer group) and moves each record into its
destination's flow (:mod:`gpufleet.delivery.flows`), where it waits, is delivered with its own backoff and circuit
breaker, and is parked if refused for good or too old: a destination that is down holds only its own records.
One dispatcher at a time routes (the holder of ``<prefix>:router``), so records keep their order; each flow is
delivered by one at a time too. Any number may run: a flow whose holder died is taken over after
``dispatcher.claim_idle_s``, at once by a dispatcher on the same host.
At-least-once: a record may be delivered twice, and carries the task id (the Kafka key) to de-duplicate on.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import redis
import structlog

from gpufleet.config import Fleet
from gpufleet.credentials import redact, redact_url
from gpufleet.delivery.flows import Entry, Flow, Lease, flow_id
from gpufleet.errors import unreachable_hint
from gpufleet.registry import connection
from gpufleet.registry.keyspace import Keyspace, entry_dest, script
from gpufleet.registry.model import REDIS_ERRORS
from gpufleet.retry import retry_until
from gpufleet.worker.lease import owner_token

log = structlog.get_logger("gpufleet.delivery.dispatcher")
GROUP = "dispatchers"
SWEEP_EVERY_S = 5.0
DRAIN_S = 10.0  # on a clean stop, what is waiting still goes out for this long (workers stop before us)


class Dispatcher:
    def __init__(self, fleet: Fleet, name: str | None = None) -> None:
        self.fleet = fleet
        s = fleet.settings
        self.client = connection.client(s.redis.url, socket_timeout=30, socket_connect_timeout=5)
        self.keys = Keyspace(s.redis.key_prefix)
        self.stream = self.keys.callbacks
        self.name = name or f"{s.worker.hostname}-{os.getpid()}"
        self.token = owner_token(s.worker.hostname, os.getpid())
        self.router = Lease(self.client, self.keys.router, self.token, s.worker.hostname, s.dispatcher.claim_idle_s)
        self.flows: dict[str, tuple[Flow, threading.Thread]] = {}
        self._route = self.client.register_script(script("route"))
        self._done = threading.Event()
        self._claim_from = ""  # while set, the router takes over pending entries from there
        self._claim_idle_ms = 0
        self._next_sweep = 0.0
        self._ended = [0, 0]  # delivered and parked by flows whose thread has ended

    @property
    def delivered(self) -> int:
        return self._ended[0] + sum(flow.delivered for flow, _ in self.flows.values())

    @property
    def parked(self) -> int:
        return self._ended[1] + sum(flow.parked for flow, _ in self.flows.values())

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
        threading.Thread(target=self._keep_leases, name="leases", daemon=True).start()
        next_look = 0.0
        try:
            while not stop.is_set():
                if time.monotonic() >= next_look:
                    self._follow_flows()
                    next_look = time.monotonic() + 1.0
                if not self._route_once(block_ms=500) and not self.router.held:
                    stop.wait(1.0)  # another dispatcher routes: see now and then whether it still does
            self._drain()
        finally:
            for flow, _ in self.flows.values():
                flow.stop.set()
            for _, thread in self.flows.values():
                thread.join(timeout=5)
            self._done.set()
            with contextlib.suppress(*REDIS_ERRORS):  # it lapses
                self.router.release()
            log.info("dispatcher stopped", delivered=self.delivered, parked=self.parked)

    def _keep_leases(self) -> None:
        """Renews the router's and the flows' leases while this process runs, even while a delivery blocks."""
        while not self._done.wait(self.router.ttl_ms / 3000):
            with contextlib.suppress(*REDIS_ERRORS):
                self.router.renew()
                for flow, _ in list(self.flows.values()):
                    flow.lease.renew()

    def _follow_flows(self) -> None:
        """A thread for each flow Redis knows, and only those: one retired (by any dispatcher) ends."""
        try:
            raw: Any = self.client.hgetall(self.keys.flows)
            known = {k.decode(): v.decode() for k, v in raw.items()}
        except REDIS_ERRORS:
            return
        for fid, (flow, thread) in list(self.flows.items()):
            if fid not in known:
                flow.stop.set()
            if not thread.is_alive():
                self._ended[0] += flow.delivered
                self._ended[1] += flow.parked
                del self.flows[fid]
        for fid, url in known.items():
            if fid not in self.flows:
                flow = Flow(self.fleet, self.client, fid, url, self.token)
                thread = threading.Thread(target=flow.run, name=f"flow-{fid}", daemon=True)
                self.flows[fid] = (flow, thread)
                thread.start()

    def _route_once(self, block_ms: int | None) -> int:
        """Move one batch of records into their flows, if this process is the router; how many."""
        try:
            if not self.router.held:
                if not self.router.take():
                    return 0
                self._claim_from, self._claim_idle_ms = "0-0", 0  # a router that died left what it read pending
            elif time.monotonic() >= self._next_sweep:
                # Read and never routed (a route a Redis failover lost): pending past claim_idle_s, taken again.
                self._claim_from = "0-0"
                self._claim_idle_ms = int(self.fleet.settings.dispatcher.claim_idle_s * 1000)
                self._next_sweep = time.monotonic() + SWEEP_EVERY_S
            entries = (self._claim() if self._claim_from else []) or self._read(block_ms)
            if not entries:
                return 0
            keys: list[Any] = [self.stream, self.keys.flows]
            args: list[Any] = [GROUP]
            for eid, fields in entries:
                url = entry_dest(fields)
                fid = flow_id(url)
                keys.append(self.keys.flow(fid))
                args += [eid, fid, url]
            self._route(keys=keys, args=args)
            self._follow_flows()
            return len(entries)
        except REDIS_ERRORS as exc:
            log.warning("cannot reach Redis to route callback records; retrying", error=redact(str(exc)))
            time.sleep(1)
            return 0

    def _read(self, block_ms: int | None) -> list[Entry]:
        batch_max = self.fleet.settings.dispatcher.batch_max
        try:
            reply: Any = self.client.xreadgroup(GROUP, self.name, {self.stream: ">"}, count=batch_max, block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("the callback stream's consumer group is gone (Redis lost its data?); creating it again")
            self._ensure_group()
            return []
        return [(eid, fields) for _, items in reply or [] for eid, fields in items]

    def _claim(self) -> list[Entry]:
        """The next page of pending entries, whoever read them: only a router holds any, and we are the router."""
        batch_max = self.fleet.settings.dispatcher.batch_max
        reply: Any = self.client.xautoclaim(
            self.stream, GROUP, self.name, self._claim_idle_ms, self._claim_from, count=batch_max
        )
        cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        self._claim_from = "" if cursor == "0-0" else cursor
        claimed: list[Entry] = [(eid, f) for eid, f in reply[1] if f]
        if claimed:
            log.warning("took over records another router had read", count=len(claimed))
        return claimed

    def _drain(self) -> None:
        """On a clean stop: route what is in the stream, and let the flows deliver what they hold, for a while."""
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            routed = self._route_once(block_ms=None)
            self._follow_flows()
            try:
                waiting = sum(flow.backlog() for flow, _ in self.flows.values())
                pending = int(self.client.xpending(self.stream, GROUP)["pending"])
            except REDIS_ERRORS:
                return
            if not routed and not waiting and not pending:
                return
            time.sleep(0.05)
