"""``/metrics`` and the scaling figure, scraped from a running fleet (``gpufleet run``: API, trigger, dispatcher,
two worker slots) and parsed with prometheus-client's own parser."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gpufleet.api.metrics import exposition
from gpufleet.registry import inventory, snapshot
from gpufleet.registry.keyspace import HISTOGRAM_BOUNDS
from gpufleet.scheduling.scaling import needs
from tests.integration.test_api import AUTH, Api, _serve

Samples = dict[str, list[Sample]]


@pytest.fixture(scope="module")
def fleet(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with _serve(services, tmp_path_factory.mktemp("metrics"), worker={"virtual_gpus": 2}) as fleet:
        yield fleet


def scrape(api: Api) -> Samples:
    r = api.client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        assert family.name.startswith(("gpufleet_", "DCGM_FI_DEV_")), family.name  # DCGM exporter's, for GPUs
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def test_metrics_need_the_token(fleet: Api) -> None:
    with httpx.Client(base_url=fleet.url, timeout=30) as anonymous:
        assert anonymous.get("/metrics").status_code == 401
        assert anonymous.get("/v1/scaling").status_code == 401


def test_a_running_fleet_reports_tasks_queues_gpus_and_delivery(fleet: Api) -> None:
    h = fleet.harness
    h.wait_for(
        lambda: sum(s.value for s in scrape(fleet).get("gpufleet_worker_ready", [])) == 2, what="both workers ready"
    )
    echoes = [fleet.invoke("echo", {"n": i}) for i in range(3)]
    failing = fleet.invoke("always_fail", {})
    h.produce("requests", [b"{not json"])  # a dead letter
    for task_id in [*echoes, failing]:
        fleet.wait_state(task_id, "SUCCEEDED", "FAILED")
    # Both GPUs busy and one more waiting: running per GPU, queue depth, its age, and the scaling figure.
    long = [fleet.invoke("coop", {"seconds": 60}, key=f"long-{i}") for i in range(3)]
    h.wait_for(lambda: sum(fleet.task(t)["state"] == "RUNNING" for t in long) == 2, what="two long tasks running")

    def settled() -> Samples | None:
        m = scrape(fleet)
        delivered = m.get("gpufleet_callbacks_delivered_total", [])
        lag = m.get("gpufleet_trigger_lag_messages", [])
        # The trigger counts its dead letter once Kafka has it: on a loaded machine, after the tasks' records.
        dead = m.get("gpufleet_dead_letters_total", [])
        # The histograms are written by the workers about once a second (registry/tally.py).
        observed = sum(s.value for s in m.get("gpufleet_task_duration_seconds_count", []))
        return m if delivered and delivered[0].value >= 4 and lag and dead and observed >= 6 else None

    m = h.wait_for(settled, what="the records delivered, the dead letter counted and the trigger's lag reported")
    assert value(m, "gpufleet_tasks_finished_total", function="echo", state="SUCCEEDED") == 3
    assert value(m, "gpufleet_tasks_finished_total", function="always_fail", state="FAILED") == 1
    assert value(m, "gpufleet_tasks_created_total", function="echo") == 3
    assert value(m, "gpufleet_tasks", function="echo", state="SUCCEEDED") == 3
    assert value(m, "gpufleet_tasks", function="coop", state="RUNNING") == 2
    assert value(m, "gpufleet_tasks", function="coop", state="QUEUED") == 1
    # Histograms: one wait per attempt that started, one duration per attempt (always_fail ran 3).
    for name, fn, n in (("gpufleet_task_duration_seconds", "echo", 3), ("gpufleet_task_duration_seconds",
                        "always_fail", 3), ("gpufleet_task_queue_wait_seconds", "echo", 3)):  # fmt: skip
        buckets = [s for s in m[f"{name}_bucket"] if s.labels["function"] == fn]
        assert [float(s.labels["le"]) for s in buckets] == [*HISTOGRAM_BOUNDS, math.inf]
        counts = [s.value for s in buckets]
        assert counts == sorted(counts) and counts[-1] == n == value(m, f"{name}_count", function=fn)
        assert 0 <= value(m, f"{name}_sum", function=fn) < 60
    queue = h.queue("coop")
    assert value(m, "gpufleet_queue_depth", queue=queue) == 1
    assert value(m, "gpufleet_queue_running_tasks", queue=queue) == 2
    assert 0 < value(m, "gpufleet_queue_oldest_age_seconds", queue=queue) < 120
    assert sum(s.value for s in m["gpufleet_gpu_running_tasks"]) == 2
    assert [s.value for s in m["gpufleet_worker_up"]] == [1, 1]
    assert all(s.value == 0 for s in m["gpufleet_worker_restarts_total"])
    assert value(m, "gpufleet_dead_letters_total", trigger="requests", reason="malformed_json") == 1
    assert {s.labels["trigger"] for s in m["gpufleet_trigger_lag_messages"]} == {"requests"}
    assert sum(s.value for s in m["gpufleet_trigger_lag_messages"]) == 0
    assert value(m, "gpufleet_callback_backlog_records") == 0
    assert value(m, "gpufleet_parked_records") == 0
    # Virtual GPUs have no NVML: no utilisation or memory samples rather than made-up zeros.
    assert not m.get("gpufleet_gpu_utilization_ratio")
    # 2 running + 1 queued on hosts of 2 slots: 2 hosts (this one is ready, nothing starting).
    assert value(m, "gpufleet_desired_workers", pool="default", model="any") == 2
    assert value(m, "gpufleet_workers", pool="default", model="any", state="ready") == 1
    need = fleet.client.get("/v1/scaling/default/any").json()
    assert need == {"pool": "default", "model": "any", "queued": 1, "running": 2, "slots_per_worker": 2,
                    "ready": 1, "starting": 0, "desired": 2, "additional": 1}  # fmt: skip
    # A pool nobody serves yet reads as zeros (KEDA's query must not fail), scaled from zero with the default.
    idle = fleet.client.get("/v1/scaling/eu/h100").json()
    assert idle["desired"] == 0 and idle["slots_per_worker"] == 1
    for task_id in long:
        fleet.client.post(f"/v1/tasks/{task_id}/cancel")
    for task_id in long:
        fleet.wait_state(task_id, "CANCELLED")
    m = scrape(fleet)
    assert value(m, "gpufleet_tasks_finished_total", function="coop", state="CANCELLED") == 3
    assert value(m, "gpufleet_desired_workers", pool="default", model="any") == 0
    assert math.isclose(value(m, "gpufleet_queue_depth", queue=queue), 0)


def test_every_name_follows_prometheus_conventions(fleet: Api) -> None:
    r = fleet.client.get("/metrics", headers=AUTH)
    for family in text_string_to_metric_families(r.text):
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        assert not any(unit in family.name for unit in ("_ms", "_milliseconds", "_mb", "_percent")), family.name
        assert family.documentation, family.name


def test_an_sqs_trigger_reports_its_queue_depth(harness: Any, moto: Any) -> None:
    from tests.contracts.test_trigger_contract import SqsSource

    source = SqsSource(harness, moto)
    source.notify(b"one", b"two", b"three")  # waiting before the trigger starts
    running = source.start()
    try:
        report = harness.wait_for(lambda: snapshot.read(harness.registry, []).trigger_lag.get("src"),
                                  what="the trigger's first report")  # fmt: skip
    finally:
        running.stop()
    assert report["kind"] == "depth" and report["values"] == {"messages": 3}


def test_nvml_figures_and_starting_hosts_reach_the_metrics(harness: Any) -> None:
    """No GPU here: an inventory as a supervisor with NVML publishes it, read back by the real collector."""
    fleet = harness.fleet()
    registry = harness.registry
    now = time.time()
    common = {"model": "H100", "virtual": False, "up": True, "seen_at": now, "restarts_total": 2,
              "queues": [f"{harness.prefix}.eu.h100", f"{harness.prefix}.eu.any"]}  # fmt: skip
    inventory.publish_gpus(registry, {
        f"gpu{i}@{host}": {**common, "worker": f"gpu{i}@{host}", "host": host, "index": i, "pid": 1000 + i,
                           "memory_total_mb": 81559, "memory_used_mb": 20480, "utilization_pct": 87}
        for host in ("ready-host", "starting-host") for i in range(2)
    })  # fmt: skip
    registry.client.hset(f"{harness.prefix}:ready", mapping={"gpu0@ready-host": 1000, "gpu1@ready-host": 1001})
    m: Samples = {}
    for family in text_string_to_metric_families(exposition(fleet, registry).decode()):
        for sample in family.samples:
            m.setdefault(sample.name, []).append(sample)
    assert value(m, "gpufleet_gpu_utilization_ratio", worker="gpu0@ready-host") == 0.87
    assert value(m, "gpufleet_gpu_memory_used_bytes", worker="gpu1@starting-host") == 20480 * 2**20
    assert value(m, "gpufleet_gpu_memory_total_bytes", worker="gpu1@starting-host") == 81559 * 2**20
    assert value(m, "gpufleet_worker_restarts_total", worker="gpu0@ready-host") == 2
    assert value(m, "gpufleet_worker_ready", worker="gpu0@starting-host") == 0
    assert value(m, "gpufleet_workers", pool="eu", model="h100", state="ready") == 1
    assert value(m, "gpufleet_workers", pool="eu", model="h100", state="starting") == 1
    # Nothing queued: nobody needed, and the starting host counts as one already there.
    assert value(m, "gpufleet_desired_workers", pool="eu", model="h100") == 0
    s = fleet.settings
    [need] = [n for n in needs(snapshot.read(registry, []), s.redis.key_prefix, 1) if n.model == "h100"]
    assert (need.slots_per_worker, need.ready, need.starting) == (2, 1, 1)
    # Five queued on hosts of two GPUs: three hosts; two exist (one still starting), so one more, not three.
    queue = f"{harness.prefix}.eu.h100"
    registry.client.sadd(f"{harness.prefix}:queues", queue)  # as the enqueue script does
    registry.client.zadd(f"{harness.prefix}:pending:{queue}", {f"t{i}": i for i in range(5)})
    [need] = [n for n in needs(snapshot.read(registry, []), s.redis.key_prefix, 1) if n.model == "h100"]
    assert (need.queued, need.desired, need.additional) == (5, 3, 1)


def test_the_readme_keda_example_scales_the_readme_function_from_zero(harness: Any) -> None:
    """Copy the README's ScaledObject and its `embed` example: the URL the ScaledObject reads is the figure that
    function's backlog counts in (before, the example read h100 while `embed` queued under `any`: never scaled)."""
    import re
    from pathlib import Path

    from gpufleet.control.plane import ControlPlane

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    declared = re.search(r'@function\(name="embed", gpu=Gpu\(model="([^"]+)"\)', readme)
    url = re.search(r'url: "http://gpufleet-api:8080/v1/scaling/([^/"]+)/([^/"]+)"', readme)
    assert declared and url
    assert url[2] == declared[1].lower()
    plane = ControlPlane(harness.fleet())
    zero = plane.scaling(url[1], url[2])[0]
    assert (zero.desired, zero.ready) == (0, 0)
    echo = harness.fleet().functions["echo"]  # declared like embed: Gpu(model="any"), pool default
    assert (echo.gpu.model, echo.gpu.pools[0]) == (declared[1], url[1])
    plane.invoke("echo", {"n": 1})
    assert plane.scaling(url[1], url[2])[0].desired == 1  # from zero: one host
