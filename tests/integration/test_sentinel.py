"""Redis under Sentinel: a master, a replica and three sentinels, real ``redis-server`` processes. The fleet finds
the master through the sentinels, follows a failover while tasks flow, and with ``redis.wait_replicas`` never
acknowledges a source before its tasks reached a replica."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from gpufleet.config import load_fleet
from gpufleet.dev.sentinel import SentinelGroup, sentinel_group
from gpufleet.errors import BrokerError
from gpufleet.intake.ids import API_ORIGIN
from gpufleet.registry.store import Registry
from tests.harness import FleetHarness

PASSWORD = "sentinel-test-8Jq2xPz7Lm4Rk9Vb"


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    # Two replicas: after a failover one is left, so intake with wait_replicas=1 goes on.
    with sentinel_group(tmp_path / "sentinel", PASSWORD, replicas=2) as group:
        yield group


def test_wait_replicas_acknowledges_only_what_a_replica_has(group: SentinelGroup, harness: FleetHarness) -> None:
    harness.write_config(redis={"url": group.url, "wait_replicas": 1, "wait_timeout_ms": 300})
    fleet = load_fleet(harness.config, env={})
    registry = Registry.for_fleet(fleet.settings)
    from gpufleet.control.plane import ControlPlane

    control = ControlPlane(fleet, registry)
    first = control.invoke("echo", {"n": 1}).id  # a replica has it: acknowledged
    replicas = [group.procs["replica0"], group.procs["replica1"]]
    for replica in replicas:
        replica.send_signal(signal.SIGSTOP)  # no replica acknowledges
    try:
        with pytest.raises(BrokerError, match=r"reached 0 of redis\.wait_replicas=1 replicas"):
            control.invoke("echo", {"n": 2}, idempotency_key="k2")
    finally:
        for replica in replicas:
            replica.send_signal(signal.SIGCONT)
    again = control.invoke("echo", {"n": 2}, idempotency_key="k2")  # the caller retries: the same task, now safe
    assert not again.created and registry.get(first) is not None
    assert registry.get(again.id)["origin"] == API_ORIGIN  # type: ignore[index]


def test_the_fleet_follows_a_failover_and_loses_nothing_acknowledged(group: SentinelGroup,
                                                                     harness: FleetHarness) -> None:  # fmt: skip
    h = harness
    h.write_config(redis={"url": group.url, "wait_replicas": 1, "wait_timeout_ms": 1000})
    h.start()
    n, sent = 200, []
    stop = threading.Event()

    def produce() -> None:  # a steady flow, across the failover
        for i in range(n):
            if stop.is_set():
                return
            h.produce("requests", [orjson.dumps({"function": "echo", "payload": {"i": i}, "id": f"m{i}"})])
            sent.append(i)
            time.sleep(0.05)

    registry = Registry.from_url(group.url, h.prefix)
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        h.wait_for(lambda: registry.counts("echo")["SUCCEEDED"] >= 5, timeout_s=90, what="tasks before the failover")
        h.wait_for(lambda: len(sent) >= n // 3, what="a third sent")
        old = group.master_port()
        group.kill("master")  # the host is gone: no clean shutdown, no last write
        h.wait_for(lambda: group.master_port() != old, timeout_s=30, what="the sentinels to promote the replica")
        producer.join(120)
    finally:
        stop.set()
    assert len(sent) == n

    def all_done() -> bool:
        states = [(registry.get(f"requests:m{i}") or {}).get("state") for i in range(n)]
        return all(s == "SUCCEEDED" for s in states)

    h.wait_for(all_done, timeout_s=180, what=f"all {n} tasks to succeed on the new master")
    # At least once: a failover can deliver a record twice, so n records may arrive before every task's has.
    expected = {f"requests:m{i}" for i in range(n)}
    h.wait_for(lambda: expected <= {r["key"] for r in h.records("success", n, timeout_s=30)}, timeout_s=120,
               what="a success record for every task")  # fmt: skip
    # A role may exit while Redis moves (gpufleet run restarts it), but none may keep failing.
    exits = [orjson.loads(line) for line in h.log_text().splitlines() if '"role exited; restarting"' in line]
    assert all(e["failures_in_a_row"] < 3 for e in exits), exits
