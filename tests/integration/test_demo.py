"""``make demo`` end to end: it exits 0, its last line is the summary, and it leaves no process behind."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from gpufleet.demo.run import _start_fleet
from gpufleet.dev import services
from gpufleet.dev.rabbitmq import rabbitmq_available
from gpufleet.dev.services import free_port
from tests.harness import FleetHarness

ROOT = Path(__file__).parents[2]


def descendants(mark: str) -> set[int]:
    """Every process that inherited ``mark`` in its environment: what the demo started, whoever their parent is
    now (a leftover is reparented), and nothing that other tests run beside it (under xdist)."""
    found = set()
    for p in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            if p.environ().get("DEMO_TEST_MARK") == mark:
                found.add(p.info["pid"])
    return found


def fleet_log(out: str) -> str:
    """The tail of the demo fleet's log, which the demo names on its first line: why a role did not come up."""
    found = re.search(r"logs in (\S+)", out)
    log = Path(found[1]) / "fleet.log" if found else None
    return f"\n--- {log}:\n" + log.read_text(errors="replace")[-4000:] if log and log.exists() else ""


def test_the_demo_takes_another_api_port_when_its_own_is_taken(
    harness: FleetHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process can bind the free port the demo picked before its fleet does (the suite runs the demo beside
    other tests): the fleet exits with EXIT_PORT_IN_USE, and the demo starts it on another port."""
    harness.write_config(api={"enabled": True, "token": secrets.token_urlsafe(32)})
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = iter([taken, free_port()])
        monkeypatch.setattr(services, "free_port", lambda: next(ports))
        with (harness.dir / "demo-fleet.log").open("wb") as log:
            fleet, proc = _start_fleet(harness.config, harness.env(), log)
    try:
        assert fleet.settings.api.port != taken and proc.poll() is None
        assert "is in use" in (harness.dir / "demo-fleet.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.mark.timeout(300)
def test_demo_runs_end_to_end_and_cleans_up(services: object) -> None:
    mark = uuid.uuid4().hex
    env = {**os.environ, "DEMO_TEST_MARK": mark}
    result = subprocess.run([sys.executable, "-m", "gpufleet", "demo"], cwd=ROOT, capture_output=True, timeout=280,
                            env=env)  # fmt: skip
    out = result.stdout.decode()
    assert result.returncode == 0, out[-4000:] + result.stderr.decode()[-4000:] + fleet_log(out)
    last = out.strip().splitlines()[-1]
    amqp = "amqp 2 messages" if rabbitmq_available() else "amqp skipped"
    assert last == (
        "demo: kafka 9 events: 6 Success, 1 RetriesExhausted, 2 dead-lettered | bucket 4 objects: 4 Success, "
        "4 thumbnails | api: gpu_info SUCCEEDED, sleep CANCELLED | job: enhance 8 bands, 1 retried, SUCCEEDED | "
        f"destinations: webhook 2 signed, s3 2 objects, {amqp}"
    )
    assert '"condition": "Success"' in out and "reason=malformed_json" in out
    leftover = {pid for pid in descendants(mark) if psutil.pid_exists(pid)}
    assert not leftover, [psutil.Process(p).cmdline() for p in leftover]
