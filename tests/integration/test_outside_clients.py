"""Clients from outside gpufleet that the README promises work, each with its own code against a live fleet:
``celery inspect`` from a plain Celery (no gpufleet app), Flower's HTTP API, and ``promtool`` on ``/metrics``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from typing import Any

import httpx
import psutil
import pytest

from gpufleet.control.plane import ControlPlane
from gpufleet.dev.services import free_port, stop
from tests.harness import FleetHarness


def live_fleet(h: FleetHarness) -> tuple[set[int], list[str]]:
    """Start the worker role; the PIDs of its processes and its Celery node names, once both GPUs are up."""
    h.write_config(worker={"virtual_gpus": 2})
    h.start("worker")
    plane = ControlPlane(h.fleet())
    h.wait_for(lambda: sum(1 for g in plane.gpus() if g.get("up") and not g["stale"]) == 2, what="both GPUs")
    assert h.proc is not None
    nodes = sorted(g["worker"] for g in plane.gpus())
    return {p.pid for p in psutil.Process(h.proc.pid).children(recursive=True)}, nodes


def outside_env(h: FleetHarness) -> dict[str, str]:
    """No gpufleet settings, and no path to gpufleet's code: what a plain Celery or Flower install has."""
    return {k: v for k, v in h.env().items() if not k.startswith(("GPUFLEET_", "PYTHONPATH"))}


def test_a_plain_celery_inspect_reads_the_workers_replies(harness: FleetHarness) -> None:
    """Before, the replies came in gpufleet's own serializer: "Refusing to deserialize untrusted content"."""
    ours, nodes = live_fleet(harness)
    replies: dict[str, Any] = {}
    for verb in ("stats", "active"):
        # Named nodes: it returns once they answer (within 30 s on a loaded machine), not after a fixed wait.
        cmd = [sys.executable, "-m", "celery", "-b", harness.services.redis_url, "inspect", verb, "--json",
               "--timeout", "30", "--destination", ",".join(nodes)]  # fmt: skip
        replies[verb] = {}
        for _ in range(4):  # a node busy starting on a loaded machine may answer the next ask
            done = subprocess.run(cmd, capture_output=True, text=True, env=outside_env(harness), timeout=120)
            assert "untrusted content" not in done.stderr
            if done.returncode == 0:
                replies[verb] |= json.loads(done.stdout)
            if set(nodes) <= set(replies[verb]):
                break
        assert set(nodes) <= set(replies[verb]), done.stdout + done.stderr
    mine = {node for node, stats in replies["stats"].items() if stats["pid"] in ours}
    assert len(mine) == 2, replies["stats"]
    assert all(replies["active"][node] == [] for node in mine)  # idle, and said so in JSON


def test_flower_lists_the_workers(harness: FleetHarness) -> None:
    ours, _ = live_fleet(harness)
    port = free_port()
    env = outside_env(harness) | {"FLOWER_UNAUTHENTICATED_API": "true"}  # as the README says
    log = open(harness.dir / "flower.log", "ab")  # noqa: SIM115 - the child writes to it
    cmd = [sys.executable, "-m", "celery", f"--broker={harness.services.redis_url}", "flower", "--address=127.0.0.1",
           f"--port={port}"]  # fmt: skip
    flower = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    log.close()
    try:
        deadline, workers = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            try:
                workers = httpx.get(f"http://127.0.0.1:{port}/api/workers?refresh=1", timeout=30).json()
            except httpx.HTTPError:
                workers = {}
            if sum(1 for w in workers.values() if (w.get("stats") or {}).get("pid") in ours) == 2:
                break
            time.sleep(1)
        found = [w for w in workers.values() if (w.get("stats") or {}).get("pid") in ours]
        assert len(found) == 2, (workers, (harness.dir / "flower.log").read_text()[-3000:])
    finally:
        stop(flower)


def test_promtool_accepts_the_metrics(harness: FleetHarness, tmp_path: Any) -> None:
    """Where Debian's prometheus package is installed (promtool): the exposition passes its lint."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    from gpufleet.api.metrics import exposition

    live_fleet(harness)
    text = exposition(harness.fleet(), harness.registry)
    assert b"gpufleet_worker_up" in text
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
