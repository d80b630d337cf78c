"""The cost of every event: each record and status says what its event used (GPU seconds over all its runs, its
wait, the cold start it paid, its peak memory, its cost), and the fleet's counters (``gpufleet usage``, ``GET
/v1/usage``, ``gpufleet_gpu_seconds_total``) add up to the same, and to the time the handlers ran."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from gpufleet.api.metrics import exposition
from gpufleet.control.plane import ControlPlane
from gpufleet.errors import InvalidRequestError
from tests.harness import FleetHarness
from tests.integration.test_engine import finished

PRICE = 3.6  # per GPU-hour: 0.001 per GPU-second


def test_each_event_says_what_it_cost_and_the_sums_match_the_handlers_busy_time(harness: FleetHarness) -> None:
    harness.write_config(worker={"virtual_gpus": 1, "gpu_hour_price": {"virtual": PRICE}})
    cp = ControlPlane(harness.fleet())
    cold = cp.invoke("echo", {"cold": True}).id  # queued before the worker starts: it waits out its warm-up
    harness.start_host("h", ["default"], env={"WARMUP_S": "1.5"})  # the `warmup` function's setup() takes 1.5 s
    [first] = finished(harness, cp, [cold])
    assert first["usage"]["setup_seconds"] == pytest.approx(1.5, abs=0.3), first["usage"]
    assert first["usage"]["queue_seconds"] > first["usage"]["setup_seconds"]

    slow = [cp.invoke("slow", {"seconds": 0.25, "n": n}).id for n in range(12)]
    oomed = cp.invoke("oomy", {"times": 1}).id
    views = finished(harness, cp, [*slow, oomed])
    busy = sum(float(harness.redis.get(f"took:{i}") or 0) for i in slow)  # as each handler measured itself
    gpu = sum(v["usage"]["gpu_seconds"] for v in views[:-1])
    assert abs(gpu - busy) / busy < 0.01, (gpu, busy)
    for v in views[:-1]:
        usage = v["usage"]
        assert usage["cost"] == pytest.approx(usage["gpu_seconds"] * PRICE / 3600, abs=1e-8)
        assert usage["setup_seconds"] == 0 and usage["peak_gpu_memory_mb"] is None  # warm; a virtual GPU
    assert views[-1]["gpu_retries"] == 1 and views[-1]["usage"]["gpu_seconds"] > 0  # both its runs

    # Its callback record says the same.
    records = [orjson.loads(f[b"value"]) for _, f in harness.redis.xrange(harness.registry.keys.callbacks)]
    [record] = [r for r in records if r["requestContext"]["requestId"] == slow[0]]
    assert record["responseContext"]["usage"] == views[0]["usage"]

    # The fleet's counters: every run, as the records add them up.
    def by_function() -> dict[str, dict[str, object]]:
        return {row["function"]: row for row in cp.usage("1h", "function")}

    rows = harness.wait_for(lambda: (r := by_function()).get("slow", {}).get("runs") == 12 and r, what="the counters")
    assert rows["slow"]["gpu_seconds"] == pytest.approx(gpu, abs=0.002)
    assert rows["slow"]["cost"] == pytest.approx(gpu * PRICE / 3600, abs=1e-5)
    assert rows["oomy"]["runs"] == 2  # the run that ran out of memory counts too
    [model] = cp.usage("1h", "model")
    assert model["model"] == "virtual" and model["runs"] == 1 + 12 + 2
    text = exposition(cp.fleet, cp.registry).decode()
    [line] = [x for x in text.splitlines() if x.startswith('gpufleet_gpu_seconds_total{function="slow"')]
    assert 'model="virtual",pool="default"' in line and float(line.split()[-1]) == pytest.approx(gpu, abs=0.002)

    cli = [sys.executable, "-m", "gpufleet", "usage", "--since", "2h", "--by", "pool", "--config", str(harness.config)]
    out = subprocess.run(cli, env=harness.env(), capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0].split() == ["POOL", "GPU", "SECONDS", "RUNS", "COST"] and "default" in out, out
    with pytest.raises(InvalidRequestError, match="90m, 24h or 7d"):
        cp.usage("forever", "function")
