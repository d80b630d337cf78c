"""Version states from live workers (issue 13): INACTIVE with none, DEPLOYING while one starts or runs setup(), ACTIVE
once setup() succeeded on one, ERROR (with the error) when it failed on every one that tried.

``warmup`` (version 3, tests/functions/testfns.py) sleeps WARMUP_S in its setup(), and raises with WARMUP_FAIL.
"""

from __future__ import annotations

from typing import Any

from gpufleet.control import ControlPlane
from tests.harness import FleetHarness


def state(plane: ControlPlane) -> dict[str, Any]:
    [version] = plane.versions("warmup")
    return version


def test_a_worker_that_starts_turns_inactive_into_deploying_then_active(harness: FleetHarness) -> None:
    plane = ControlPlane(harness.fleet())
    assert state(plane) == {"version": "3", "state": "INACTIVE", "workers": 0, "declared": True}
    harness.start_host("h1", ["default"], env={"WARMUP_S": "4"})
    seen = [harness.wait_for(lambda: state(plane)["state"] == "DEPLOYING" and state(plane), what="DEPLOYING")]
    harness.wait_for(lambda: state(plane)["state"] == "ACTIVE", what="ACTIVE once setup() is done")
    assert seen and state(plane)["workers"] == 1
    assert plane.functions()[[f["name"] for f in plane.functions()].index("warmup")]["state"] == "ACTIVE"
    harness.stop_host("h1")
    harness.wait_for(lambda: state(plane)["state"] == "INACTIVE", timeout_s=30, what="INACTIVE once it is gone")


def test_a_setup_that_fails_on_every_worker_is_error_with_its_error_and_one_that_works_makes_it_active(
    harness: FleetHarness,
) -> None:
    plane = ControlPlane(harness.fleet())
    harness.start_host("broken", ["default"], env={"WARMUP_FAIL": "1"})
    failed = harness.wait_for(lambda: state(plane)["state"] == "ERROR" and state(plane), what="ERROR")
    assert "RuntimeError: no model file at /models/warmup.bin" in failed["error"] and failed["workers"] == 1
    harness.start_host("good", ["default"])
    harness.wait_for(lambda: state(plane)["state"] == "ACTIVE", what="ACTIVE: setup() works on one")
    assert state(plane)["workers"] == 2 and "error" not in state(plane)
