"""Warm models with real worker processes and real Redis: a worker keeps ``warm_functions`` loaded, unloads the least
recently used through its teardown() hook to load another, tasks go to the worker that has their function loaded,
and a function nobody has loaded waits at most ``cold_wait_s`` before a worker loads it."""

from __future__ import annotations

from pathlib import Path

from gpufleet.api.metrics import exposition
from gpufleet.control.plane import ControlPlane
from tests.harness import FleetHarness
from tests.integration.test_engine import finished

FUNCTIONS = Path(__file__).parents[1] / "functions_warm"
COLD_WAIT_S = 2.0


def test_tasks_go_where_their_model_is_loaded_and_a_cold_one_waits_a_bounded_time(harness: FleetHarness) -> None:
    host = f"warm-{harness.prefix}"
    harness.write_config(functions=[str(FUNCTIONS)])
    harness.start_host(host, ["default"], virtual_gpus=2, warm_functions=1, cold_wait_s=COLD_WAIT_S)
    cp = ControlPlane(harness.fleet())
    harness.wait_for(lambda: len([g for g in cp.gpus() if g["up"]]) == 2, what="both workers up")

    def count(kind: str, fn: str) -> int:
        return int(harness.redis.get(f"{kind}:{host}:{fn}") or 0)

    harness.wait_for(lambda: count("loads", "m1") == 2, what="each worker's first model loaded at boot")
    assert count("loads", "m2") == 0  # one at a time: the rest load when a task comes

    # Nobody has m2 loaded: its task waits cold_wait_s, no longer, then a worker unloads m1 (teardown) and loads it.
    [first] = finished(harness, cp, [cp.invoke("m2", {}).id])
    usage = first["usage"]
    assert first["state"] == "SUCCEEDED" and COLD_WAIT_S <= usage["queue_seconds"] < COLD_WAIT_S + 3, usage
    assert usage["setup_seconds"] > 0.4
    assert count("loads", "m2") == 1 and count("unloads", "m1") == 1
    m2_worker = first["result"]["worker"]
    metric = 'gpufleet_cold_start_seconds_count{function="m2"} 1.0'
    harness.wait_for(lambda: metric in exposition(cp.fleet, cp.registry).decode(), what="the cold start in metrics")

    # From now on each model's tasks go to the worker that has it loaded: no more loads.
    ids = [cp.invoke(fn, {}).id for _ in range(8) for fn in ("m1", "m2")]
    done = finished(harness, cp, ids)
    assert {d["state"] for d in done} == {"SUCCEEDED"}
    assert {d["result"]["worker"] for d in done if d["function"] == "m2"} == {m2_worker}
    assert m2_worker not in {d["result"]["worker"] for d in done if d["function"] == "m1"}
    assert (count("loads", "m1"), count("loads", "m2")) == (2, 1)
    assert all(d["usage"]["setup_seconds"] == 0 for d in done)

    # While m2's worker is busy, the other waits cold_wait_s for it, no longer, then loads m2 itself.
    busy = cp.invoke("m2", {"seconds": 8}).id
    harness.wait_for(lambda: cp.status(busy)["state"] == "RUNNING", what="m2's worker busy")
    [late] = finished(harness, cp, [cp.invoke("m2", {}).id])
    assert late["result"]["worker"] != m2_worker and count("loads", "m2") == 2
    assert COLD_WAIT_S <= late["usage"]["queue_seconds"] < COLD_WAIT_S + 3, late["usage"]
