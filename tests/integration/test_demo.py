"""``make demo`` end to end: it exits 0, its last line is the summary, and it leaves no process behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from gpufleet.dev.rabbitmq import rabbitmq_available

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


@pytest.mark.timeout(300)
def test_demo_runs_end_to_end_and_cleans_up(services: object) -> None:
    mark = uuid.uuid4().hex
    env = {**os.environ, "DEMO_TEST_MARK": mark}
    result = subprocess.run([sys.executable, "-m", "gpufleet", "demo"], cwd=ROOT, capture_output=True, timeout=280,
                            env=env)  # fmt: skip
    out = result.stdout.decode()
    assert result.returncode == 0, out[-4000:] + result.stderr.decode()[-4000:]
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
