"""Version states from live workers (issue 13): INACTIVE with none, DEPLOYING while one starts or runs setup(), ACTIVE
once setup() succeeded on one, ERROR (with the error) when it failed on every one that tried.

``warmup`` (version 3, tests/functions/testfns.py) sleeps WARMUP_S in its setup(), and raises with WARMUP_FAIL.
"""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.api.metrics import exposition
from gpufleet.control.plane import ControlPlane
from gpufleet.errors import ConflictError, InvalidRequestError, NotReadyError
from gpufleet.intake.path import Intake, Producer
from gpufleet.registry.model import Enqueued
from gpufleet.triggers.ingest import Ingest, SourceMessage
from tests.harness import FleetHarness
from tests.integration.test_cli_control import cli, cli_json


def state(plane: ControlPlane) -> dict[str, Any]:
    [version] = plane.versions("warmup")
    return version


def test_a_worker_that_starts_turns_inactive_into_deploying_then_active(harness: FleetHarness) -> None:
    plane = ControlPlane(harness.fleet())
    assert state(plane) == {"version": "3", "state": "INACTIVE", "workers": 0, "declared": True, "queued": 0}
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


def test_a_version_asked_for_runs_only_where_that_version_runs_and_the_function_anywhere(
    harness: FleetHarness,
) -> None:
    # A rolling update half done: one host runs version 3 of "versioned", the other version 4.
    harness.start_host("h3", ["default"], env={"VERSIONED_AS": "3"})
    harness.start_host("h4", ["default"], env={"VERSIONED_AS": "4"})
    plane = ControlPlane(harness.fleet())  # this process loads version 1: declared here, served nowhere
    harness.wait_for(lambda: {v["version"]: v["state"] for v in plane.versions("versioned")}
                     == {"1": "INACTIVE", "3": "ACTIVE", "4": "ACTIVE"}, what="both versions ACTIVE")  # fmt: skip
    fours = [plane.invoke("versioned:4", {"i": i}).id for i in range(6)]
    threes = [plane.invoke("versioned:3", {"i": i}).id for i in range(6)]
    either = [plane.invoke("versioned", {"i": i}).id for i in range(6)]
    assert plane.status(fours[0])["queue"] == f"{harness.prefix}.default.any.versioned:4"
    every = fours + threes + either
    harness.wait_for(lambda: all(plane.status(i)["state"] == "SUCCEEDED" for i in every), what="all of them")
    assert {plane.status(i)["worker"].split("@")[1] for i in fours} == {"h4"}
    assert {plane.status(i)["worker"].split("@")[1] for i in threes} == {"h3"}
    assert {plane.status(i)["result"]["ran"] for i in either} <= {"3", "4"}  # the function's queue: any version
    assert all(harness.runs(i) == 1 for i in every)
    with pytest.raises(InvalidRequestError, match=r"version '4:x' of 'versioned'"):
        plane.invoke("versioned:4:x", {})


def test_a_version_no_worker_ever_served_is_refused_at_intake(harness: FleetHarness) -> None:
    """Before: any qualifier was taken (``echo:<anything>``): 21 junk versions made 120 metric series, and tasks
    that waited for ever. Now a version is the declared one, or one a worker of the fleet served lately."""
    harness.start_host("h4", ["default"], env={"VERSIONED_AS": "4"})
    plane = ControlPlane(harness.fleet())  # declares version 1
    harness.wait_for(lambda: {v["version"]: v["state"] for v in plane.versions("versioned")}.get("4") == "ACTIVE",
                     what="version 4 up")  # fmt: skip
    assert plane.invoke("versioned:4", {}).created and plane.invoke("versioned:1", {}).created  # served; declared
    for junk in ("7", "latest", "4.0"):
        with pytest.raises(InvalidRequestError, match=r"versioned:.*no such version; this fleet declares 1, and "
                           r"its workers served lately \['4'\]") as refused:  # fmt: skip
            plane.invoke(f"versioned:{junk}", {})
        assert refused.value.code == "unknown_version"
    # A trigger's message for one: a dead letter with the reason, never a task.
    ingest = Ingest(harness.fleet(), harness.fleet().triggers["requests"])
    try:
        batch = ingest.prepare([SourceMessage(orjson.dumps({"function": "versioned:7", "payload": {}}), "t:1", "1")])
    finally:
        ingest.close()
    assert not batch.tasks and [d.headers["reason"] for d in batch.dead] == ["unknown_version"]
    # Its host gone (a rolling update between two hosts), version 4 is still one a task may wait for.
    harness.stop_host("h4")
    assert plane.invoke("versioned:4", {"after": 1}).created
    assert not [q for q in harness.registry.queues() if q.endswith((":7", ":latest", ":4.0"))]


def test_a_canary_alias_splits_invocations_by_its_weights_and_a_change_at_run_time_is_logged(
    harness: FleetHarness,
) -> None:
    harness.write_config(aliases={"versioned": {"prod": {"3": 0.9, "4": 0.1}}})
    plane = ControlPlane(harness.fleet())
    assert plane.aliases("versioned") == {"prod": {"3": 0.9, "4": 0.1}}
    n = 1000
    views = [plane.status(plane.invoke("versioned:prod", {"i": i}).id) for i in range(n)]
    fours = sum(v["version"] == "4" for v in views)
    assert {v["version"] for v in views} == {"3", "4"}
    # Binomial(1000, 0.1): mean 100, standard deviation 9.5; 60-140 is more than 4 of them either side.
    assert 60 <= fours <= 140, fours
    assert all(v["queue"] == f"{harness.prefix}.default.any.versioned:{v['version']}" for v in views)
    queued = {v["version"]: (v["state"], v["queued"]) for v in plane.versions("versioned")}
    assert queued == {"1": ("INACTIVE", 0), "3": ("INACTIVE", n - fours), "4": ("INACTIVE", fours)}  # no worker here
    # The same per version in `gpufleet queue`, `gpufleet functions` (with the alias) and the metrics.
    assert plane.queue("versioned")["versions"] == {"1": 0, "3": n - fours, "4": fours}
    assert plane.queue("versioned")["length"] == n
    shown = cli(harness, "queue", "versioned")
    assert shown.returncode == 0, shown.stderr
    queue_line = shown.stdout.splitlines()[1]
    assert f"1: 0, 3: {n - fours}, 4: {fours}" in queue_line, queue_line
    [listed] = [f for f in cli_json(harness, "functions") if f["name"] == "versioned"]
    assert listed["aliases"] == {"prod": {"3": 0.9, "4": 0.1}}
    assert [(v["version"], v["state"], v["queued"]) for v in listed["versions"]] == [
        ("1", "INACTIVE", 0), ("3", "INACTIVE", n - fours), ("4", "INACTIVE", fours)]  # fmt: skip
    [function_line] = [line for line in cli(harness, "functions").stdout.splitlines() if line.startswith("versioned")]
    assert "1* INACTIVE, 3 INACTIVE, 4 INACTIVE" in function_line and "prod (3: 90%, 4: 10%)" in function_line
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in
               text_string_to_metric_families(exposition(harness.fleet(), harness.registry).decode())
               for s in family.samples}  # fmt: skip
    assert metrics[("gpufleet_version_queued_tasks", (("function", "versioned"), ("version", "4")))] == fours
    assert metrics[("gpufleet_version_state", (("function", "versioned"), ("state", "INACTIVE"), ("version", "3")))]

    # Moved at run time, over the config: every intake (here a second control plane) follows within a second.
    assert plane.set_alias("versioned", "prod", {"4": 1}, by="test") == {"prod": {"4": 1}}
    other = ControlPlane(harness.fleet())
    harness.wait_for(lambda: other.aliases("versioned") == {"prod": {"4": 1}}, timeout_s=5, what="the change")
    assert {other.status(other.invoke("versioned:prod", {}).id)["version"] for _ in range(20)} == {"4"}
    [(_, change)] = harness.redis.xrange(f"{harness.prefix}:alias-log")
    assert orjson.loads(change[b"change"])["weights"] == {"4": 1} and orjson.loads(change[b"change"])["by"] == "test"

    # A "default" alias is what the plain name means; bad aliases and weights are refused.
    plane.set_alias("versioned", "default", {"3": 1}, by="test")
    assert plane.status(plane.invoke("versioned", {}).id)["version"] == "3"
    for alias, weights in (("Prod", {"3": 1}), ("prod", {}), ("prod", {"3": 0}), ("prod", {"3:x": 1})):
        with pytest.raises(InvalidRequestError):
            plane.set_alias("versioned", alias, weights, by="test")


def test_a_worker_whose_setup_failed_hands_its_tasks_back_and_serves_them_once_setup_works(
    harness: FleetHarness,
) -> None:
    flag = f"{harness.prefix}-model"
    harness.start_host("h1", ["default"], env={"WARMUP_FAIL": flag}, setup_retry_s=2)
    plane = ControlPlane(harness.fleet())
    harness.wait_for(lambda: state(plane)["state"] == "ERROR", what="ERROR")
    # Queued as a trigger would (triggers queue whatever the state; an invocation of warmup would be refused).
    intake = Intake(harness.fleet(), Producer("test", "test", 4096))
    [created] = harness.registry.enqueue_many([intake.task(intake.function("warmup"), {}, "t-1", "test")])
    assert created is Enqueued.CREATED
    waited = harness.wait_for(lambda: (v := plane.status("t-1"))["last_error"] and v, what="the task handed back")
    assert waited["state"] == "QUEUED" and waited["attempts"] == 0, waited  # no attempt spent on a broken worker
    assert waited["last_error"]["errorType"] == "SetupFailed"
    assert "no model file at /models/warmup.bin" in waited["last_error"]["errorMessage"]
    time.sleep(3)
    assert plane.status("t-1")["state"] == "QUEUED" and harness.runs("t-1") == 0  # it waits, as for an INACTIVE one

    harness.redis.set(f"fixed:{flag}", 1)  # the model file is there now: the next try of setup() works
    harness.wait_for(lambda: plane.status("t-1")["state"] == "SUCCEEDED", what="the task, once setup() works")
    assert plane.status("t-1")["attempts"] == 1 and state(plane)["state"] == "ACTIVE"


def test_a_worker_whose_setup_keeps_failing_hands_back_less_and_less_often(harness: FleetHarness) -> None:
    """Its pause after each hand-back doubles (1, 2, 4 s...) up to setup_retry_s: in 10 s, 4 hand-backs at most
    (it was one a second, for ever)."""
    flag = f"{harness.prefix}-model"
    harness.start_host("h1", ["default"], virtual_gpus=1, env={"WARMUP_FAIL": flag}, setup_retry_s=30)
    plane = ControlPlane(harness.fleet())
    harness.wait_for(lambda: state(plane)["state"] == "ERROR", what="ERROR")
    intake = Intake(harness.fleet(), Producer("test", "test", 4096))
    harness.registry.enqueue_many([intake.task(intake.function("warmup"), {}, "t-1", "test")])
    log = harness.dir / "host-h1.log"

    def pauses() -> list[float]:
        lines = [json.loads(line) for line in log.read_text().splitlines() if "task handed back" in line]
        return [line["pause_s"] for line in lines]

    harness.wait_for(lambda: pauses(), what="the first hand-back")
    time.sleep(10)
    seen = pauses()
    assert seen[:4] == [1.0, 2.0, 4.0, 8.0][: len(seen)] and 3 <= len(seen) <= 5, seen
    assert plane.status("t-1")["attempts"] == 0 and harness.runs("t-1") == 0


def test_a_rolling_update_from_3_to_4_loses_no_task(harness: FleetHarness) -> None:
    plane = ControlPlane(harness.fleet())

    def states() -> dict[str, str]:
        return {v["version"]: v["state"] for v in plane.versions("versioned")}

    def send(n: int) -> list[str]:
        return [plane.invoke("versioned", {"i": i}).id for i in range(n)]

    harness.start_host("h3", ["default"], env={"VERSIONED_AS": "3"})
    harness.wait_for(lambda: states().get("3") == "ACTIVE", what="version 3 up")
    before = send(30)
    harness.start_host("h4", ["default"], env={"VERSIONED_AS": "4"})
    during = send(30)
    harness.wait_for(lambda: states().get("4") == "ACTIVE", what="version 4 up")
    harness.stop_host("h3")  # as a rolling update does: stop the old host once the new one is up
    after = send(30)
    every = before + during + after
    harness.wait_for(lambda: all(plane.status(i)["state"] == "SUCCEEDED" for i in every), what="every task")
    assert all(harness.runs(i) == 1 for i in every)
    assert {plane.status(i)["result"]["ran"] for i in after} == {"4"}
    # Version 3 had no task of its own: once its host is gone, it is not listed (or listed INACTIVE) any more.
    harness.wait_for(
        lambda: states().get("3", "INACTIVE") == "INACTIVE" and states()["4"] == "ACTIVE", what="3 gone, 4 up"
    )


def test_a_function_that_refuses_when_inactive_says_why_and_takes_the_task_once_active(harness: FleetHarness) -> None:
    plane = ControlPlane(harness.fleet())  # warmup: when_inactive="refuse"
    with pytest.raises(NotReadyError, match="warmup version 3 is INACTIVE") as err:
        plane.invoke("warmup:3", {})
    assert err.value.code == "version_not_active" and err.value.status == 503
    harness.start_host("broken", ["default"], env={"WARMUP_FAIL": "1"})
    harness.wait_for(lambda: state(plane)["state"] == "ERROR", what="ERROR")
    with pytest.raises(ConflictError, match="no model file") as failed:
        plane.invoke("warmup", {})
    assert failed.value.code == "version_error" and failed.value.status == 409
    harness.start_host("good", ["default"])  # the broken host stays up: it hands the function's tasks back
    harness.wait_for(lambda: state(plane)["state"] == "ACTIVE", what="ACTIVE")
    task = plane.invoke("warmup:3", {}).id
    harness.wait_for(lambda: plane.status(task)["state"] == "SUCCEEDED", what="the task, on the good host")
    assert plane.status(task)["worker"].endswith("@good")


def test_the_version_asked_for_stays_with_the_task_through_cancel_and_retry(harness: FleetHarness) -> None:
    plane = ControlPlane(harness.fleet())  # no worker: the task waits in the queue of version 1, the declared one
    task = plane.invoke("versioned:1", {"n": 1}).id
    assert plane.cancel(task)["outcome"] == "cancelled"
    [(_, entry)] = harness.redis.xrange(harness.registry.keys.callbacks)
    record = orjson.loads(entry[b"value"])["requestContext"]
    assert record["functionVersion"] == "1" and record["functionArn"].endswith(":function:versioned:1"), record
    assert plane.retry(task)["state"] == "QUEUED"
    view = plane.status(task)
    assert view["version"] == "1" and view["queue"] == f"{harness.prefix}.default.any.versioned:1", view
