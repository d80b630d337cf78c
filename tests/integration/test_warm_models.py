"""Warm models with real worker processes and real Redis: a worker keeps ``warm_functions`` loaded and unloads one
through its teardown() hook to load another; a task goes to the worker that has its function loaded, waiting at most
``cold_wait_s`` for it (twice that, then another loads it), and a free worker loads a function nobody has loaded at
once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gpufleet import function
from gpufleet.api.metrics import exposition
from gpufleet.control.plane import ControlPlane
from gpufleet.worker.warmup import Affinity, Setups
from tests.harness import FleetHarness
from tests.integration.test_engine import finished

FUNCTIONS = Path(__file__).parents[1] / "functions_warm"
COLD_WAIT_S = 2.0


def test_tasks_go_where_their_model_is_loaded_and_wait_a_bounded_time_for_it(harness: FleetHarness) -> None:
    host = f"warm-{harness.prefix}"
    harness.write_config(functions=[str(FUNCTIONS)])
    harness.start_host(host, ["default"], virtual_gpus=2, warm_functions=1, cold_wait_s=COLD_WAIT_S)
    cp = ControlPlane(harness.fleet())
    harness.wait_for(lambda: len([g for g in cp.gpus() if g["up"]]) == 2, what="both workers up")

    def count(kind: str, fn: str) -> int:
        return int(harness.redis.get(f"{kind}:{host}:{fn}") or 0)

    harness.wait_for(lambda: count("loads", "m1") == 2, what="each worker's first model loaded at boot")
    assert count("loads", "m2") == 0  # one at a time: the rest load when a task comes

    # Nobody has m2 loaded: a free worker unloads m1 (teardown) and loads it at once; no use waiting for anyone.
    [first] = finished(harness, cp, [cp.invoke("m2", {}).id])
    usage = first["usage"]
    assert first["state"] == "SUCCEEDED" and usage["queue_seconds"] < COLD_WAIT_S, usage
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

    # While m2's worker is busy, the other waits twice cold_wait_s for it, no longer, then loads m2 itself.
    busy = cp.invoke("m2", {"seconds": 8}).id
    harness.wait_for(lambda: cp.status(busy)["state"] == "RUNNING", what="m2's worker busy")
    [late] = finished(harness, cp, [cp.invoke("m2", {}).id])
    assert late["result"]["worker"] != m2_worker and count("loads", "m2") == 2
    assert 2 * COLD_WAIT_S <= late["usage"]["queue_seconds"] < 2 * COLD_WAIT_S + 3, late["usage"]


def test_the_order_a_worker_reads_its_queues_in_and_what_it_unloads_first(harness: FleetHarness) -> None:
    """Affinity on a real Redis: a worker that keeps two of six functions loaded reads the due queues of its own
    loaded functions first, then the due queues of functions it has not loaded (twice due where another worker has
    them loaded), then its own, then those of functions nobody has loaded, and leaves the rest to the workers that
    have them loaded; to make room it unloads a function another worker has loaded too before one only it has,
    however recently used."""
    reg, now = harness.registry, time.time()
    fns = {name: _loadable(name) for name in "abcdef"}
    setups = Setups(reg, "w1", 30, capacity=2)
    setups.warm_up(fns.values())  # a and b loaded
    affinity = Affinity(setups, reg, {f"q{name}": name for name in fns}, wait_s=5)
    affinity.say()
    assert reg.client.zscore(reg.keys.warm("qa"), "w1") and not reg.client.zscore(reg.keys.warm("qc"), "w1")
    reg.client.zadd(reg.keys.warm("qe"), {"w2": now})  # another worker has e and f loaded
    reg.client.zadd(reg.keys.warm("qf"), {"w2": now})
    waits = {"qa": 1, "qb": 6, "qc": 6, "qd": 1, "qe": 6, "qf": 11}
    for n, (queue, waited_s) in enumerate(waits.items()):
        reg.client.zadd(reg.keys.pending(queue), {f"t{n}": n})
        reg.client.hset(reg.keys.task(f"t{n}"), "queued_at", now - waited_s)

    assert affinity.arrange(list(waits)) == ["qb", "qc", "qf", "qa", "qd"]
    assert affinity.leave("e", 6.0)  # loaded elsewhere: back for that worker
    assert affinity.leave("d", 1.0)  # loaded nowhere, but this worker has its own loaded functions' tasks waiting
    assert not affinity.leave("c", 6.0) and not affinity.leave("f", 11.0) and not affinity.leave("a", 1.0)

    for queue in ("qa", "qb"):
        reg.client.delete(reg.keys.pending(queue))
    reg.client.zadd(reg.keys.warm("qa"), {"w2": now})  # a is loaded by w2 too; b only here
    time.sleep(affinity.CHECK_S)  # its next look reads Redis again
    setups.state_of(fns["a"])  # a: the most recently used, and used more
    assert affinity.arrange(["qd"]) == ["qd"] and setups.ready(fns["d"])
    assert list(setups.states) == ["b", "d"]
    assert "w1" not in {w.decode() for w in reg.client.zrange(reg.keys.warm("qa"), 0, -1)}  # said at once


def _loadable(name: str) -> Any:
    fn = function(name=name)(lambda event, ctx: None)
    fn.setup(lambda: {"model": name})
    return fn
