"""Registry transitions on a real Redis: compare-and-set claims, leases, retries, and the dispatcher's delivery."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from gpufleet.worker.lease import owner_is_dead, owner_token


def test_owner_liveness_is_judged_by_pid_and_start_time() -> None:
    me = owner_token("hostA", os.getpid())
    assert not owner_is_dead(me, "hostA")
    assert not owner_is_dead(me, "hostB")  # another host: only the lease can tell
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    token = owner_token("hostA", child.pid) if child.poll() is None else f"hostA/{child.pid}/1/x"
    child.wait()
    assert owner_is_dead(token, "hostA")
    assert owner_is_dead(f"hostA/{os.getpid()}/12345/x", "hostA")  # same pid, other start time: pid reused
    # An older release's token holds a wall-clock start, which a step of the clock moves a little: still alive.
    wall = int(psutil.Process().create_time() * 1000)
    assert not owner_is_dead(f"hostA/{os.getpid()}/{wall + 1500}/x", "hostA")
    assert owner_is_dead(f"hostA/{os.getpid()}/{wall - 60_000}/x", "hostA")
