"""Stopping a worker host: SIGTERM drains it (no new task, running ones finish within worker.shutdown_grace_s); a
task past the grace is handed back, its attempt not counted, and another host runs it. Celery's own event receiver
sees the workers and tasks (what Flower shows)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpufleet.celery_app import create_app
from gpufleet.control.plane import ControlPlane
from tests.harness import FleetHarness


def host(services: Any, tmp: Path, name: str, prefix: str | None = None, **worker: Any) -> FleetHarness:
    tmp.mkdir(exist_ok=True)
    h = FleetHarness(services, tmp)
    if prefix:
        h.prefix = prefix
    h.write_config(worker={"hostname": name, **worker})
    return h


@pytest.fixture
def hosts(services: Any, tmp_path: Path) -> Iterator[list[FleetHarness]]:
    made: list[FleetHarness] = []
    yield made
    for h in made:
        h.stop()


def test_sigterm_drains_a_host_and_hands_back_what_runs_past_the_grace(services: Any, tmp_path: Path,
                                                                       hosts: list[FleetHarness]) -> None:  # fmt: skip
    a = host(services, tmp_path / "a", "host-a", shutdown_grace_s=4, virtual_gpus=2)
    hosts.append(a)
    control = ControlPlane(a.fleet())
    a.start("worker")
    a.wait_for(lambda: len([g for g in control.gpus() if g["up"]]) == 2, what="host-a's two workers")
    short = control.invoke("slow", {"seconds": 2}).id  # ends within the grace
    long = control.invoke("slow", {"seconds": 12}).id  # does not
    a.wait_for(lambda: all(control.status(t)["state"] == "RUNNING" for t in (short, long)), what="both running")
    waiting = control.invoke("echo", {"after": "drain"}).id  # both GPUs busy: it waits
    assert a.proc is not None
    stopped_at = time.monotonic()
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(timeout=30) == 0
    took = time.monotonic() - stopped_at
    assert 4 <= took < 15, took  # the grace, then the kill and the hand-back: not the long task's 12 s
    a.proc = None
    done = control.status(short)
    assert done["state"] == "SUCCEEDED" and done["worker"].endswith("@host-a") and done["attempts"] == 1
    back = control.status(long)
    assert back["state"] == "QUEUED" and back["attempts"] == 0, back
    assert back["last_error"]["errorType"] == "WorkerStopped"
    assert control.position(long)["position"] == 1  # at the head of its queue
    assert control.status(waiting)["state"] == "QUEUED" and a.runs(waiting) == 0  # a draining host takes nothing
    assert a.runs(long) == 1

    b = host(services, tmp_path / "b", "host-b", prefix=a.prefix)
    hosts.append(b)
    b.start("worker")
    b.wait_for(lambda: control.status(long)["state"] == "SUCCEEDED", timeout_s=60, what="host-b to run it")
    ran = control.status(long)
    assert ran["worker"].endswith("@host-b") and ran["attempts"] == 1 and ran["result"]["attempt"] == 1
    b.wait_for(lambda: control.status(waiting)["state"] == "SUCCEEDED", what="the waiting task")
    assert a.runs(long) == 2 and a.runs(short) == 1 and a.runs(waiting) == 1
    assert control.queue("slow")["counts"]["SUCCEEDED"] == 2


def test_two_hosts_cannot_share_a_worker_hostname(services: Any, tmp_path: Path, hosts: list[FleetHarness]) -> None:
    """Leases and takeovers key on worker.hostname: a second live host under the same name is refused."""
    a = host(services, tmp_path / "a", "twin", virtual_gpus=1)
    hosts.append(a)
    a.start("worker")
    control = ControlPlane(a.fleet())
    a.wait_for(lambda: any(g["up"] for g in control.gpus()), what="the first host")
    b = host(services, tmp_path / "b", "twin", prefix=a.prefix, virtual_gpus=1)
    hosts.append(b)
    b.start("worker")
    assert b.proc is not None and b.proc.wait(timeout=60) == 2
    assert "another worker host is running as worker.hostname='twin'" in b.log_text()
    assert a.proc is not None and a.proc.poll() is None  # the first one goes on
    b.proc = None
    assert a.stop() == 0  # a clean stop gives the name up at once
    b.start("worker")
    b.wait_for(lambda: b.log_text().count('"gpu worker started"') == 1, what="the second host, now alone")
    assert b.proc is not None and b.proc.poll() is None


def test_celery_event_receiver_sees_workers_and_tasks(services: Any, tmp_path: Path,
                                                     hosts: list[FleetHarness]) -> None:  # fmt: skip
    h = host(services, tmp_path, "host-e", virtual_gpus=1)
    hosts.append(h)
    app = create_app(h.fleet())
    seen: list[dict[str, Any]] = []
    # One subscription for the whole test: events are fanned out to whoever listens at that moment, so a receiver
    # that reconnects (itercapture with a timeout does) misses what is sent in between.
    with app.connection() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None, "wakeup": False},
                                  daemon=True)  # fmt: skip
        thread.start()
        try:
            _check_events(h, seen)
        finally:
            receiver.should_stop = True  # looked at after each second of silence
            thread.join(10)


def _check_events(h: FleetHarness, seen: list[dict[str, Any]]) -> None:
    def types(uuid: str | None = None) -> set[str]:
        return {e["type"] for e in list(seen) if uuid is None or e.get("uuid") == uuid}

    h.start("worker")
    # A heartbeat seen proves the receiver listens, so the task's events cannot be sent before it does.
    h.wait_for(lambda: "worker-heartbeat" in types(), what="a worker heartbeat")
    control = ControlPlane(h.fleet())
    task_id = control.invoke("echo", {"seen": "by flower"}).id
    h.wait_for(lambda: control.status(task_id)["state"] == "SUCCEEDED", what="the task")
    h.wait_for(lambda: {"task-received", "task-started", "task-succeeded"} <= types(task_id), what="task events")
    workers = {e["hostname"] for e in list(seen) if e["type"].startswith("worker-")}
    assert workers == {"vgpu0@host-e"}
    received = next(e for e in seen if e["type"] == "task-received" and e.get("uuid") == task_id)
    assert received["name"] == "gpufleet.run"
