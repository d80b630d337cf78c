"""End to end on real servers and worker processes: Kafka message -> GPU task -> Kafka callback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import orjson

from gpufleet import trace
from tests.harness import FleetHarness, nonzero


def successes(h: FleetHarness, n: int) -> list[dict]:
    return [r for r in h.records("success", n) if r["headers"]["condition"] == "Success"]


def test_n_messages_give_n_success_callbacks_and_one_record_each(harness: FleetHarness) -> None:
    harness.start()
    n = 20
    harness.produce("requests", [orjson.dumps({"function": "echo", "payload": {"i": i}, "id": f"m{i}"})
                                 for i in range(n)])  # fmt: skip
    records = successes(harness, n)
    assert sorted(r["key"] for r in records) == sorted(f"requests:m{i}" for i in range(n))
    for r in records:
        body = r["value"]
        i = int(r["key"].removeprefix("requests:m"))
        assert trace.parse(r["headers"].pop("traceparent")) is not None  # a new trace: the message had none
        assert r["headers"] == {"condition": "Success", "function": "echo"}
        assert body["requestContext"]["requestId"] == r["key"]
        assert body["requestContext"]["condition"] == "Success"
        assert body["requestContext"]["approximateInvokeCount"] == 1
        assert body["requestPayload"] == {"i": i}
        assert body["responsePayload"] == {"echo": {"i": i}, "attempt": 1}
        assert body["responseContext"]["gpu"].startswith("vgpu")
        assert body["responseContext"]["durationMs"] >= 0
    for i in range(n):
        rec = harness.registry.get(f"requests:m{i}")
        assert rec is not None and rec["state"] == "SUCCEEDED" and rec["attempts"] == 1
        assert rec["result"] == {"echo": {"i": i}, "attempt": 1}
        assert rec["worker"].startswith("vgpu") and rec["started_at"] <= rec["finished_at"]
        assert harness.runs(f"requests:m{i}") == 1
    assert nonzero(harness.registry.counts("echo")) == {"SUCCEEDED": n}


def test_failing_handler_is_retried_then_reports_retries_exhausted(harness: FleetHarness) -> None:
    harness.start()
    harness.send("always_fail", {"x": 1}, id="bad-1")
    [record] = harness.records("failure", 1)
    body = record["value"]
    assert record["key"] == "requests:bad-1" and record["headers"]["condition"] == "RetriesExhausted"
    assert body["requestContext"]["condition"] == "RetriesExhausted"
    assert body["requestContext"]["approximateInvokeCount"] == 3
    # As Lambda's: the invoke happened (200), the function raised (Unhandled); which function and version ran.
    assert body["responseContext"]["statusCode"] == 200 and body["responseContext"]["functionError"] == "Unhandled"
    assert body["responseContext"]["executedVersion"] == "$LATEST"
    assert (
        body["requestContext"]["functionArn"] == f"arn:gpufleet:gpufleet::{harness.prefix}:function:always_fail:$LATEST"
    )
    assert body["responsePayload"]["errorType"] == "ValueError"
    assert body["responsePayload"]["errorMessage"] == "boom on attempt 3"
    assert any("ValueError" in line for line in body["responsePayload"]["stackTrace"])
    assert harness.runs("requests:bad-1") == 3
    rec = harness.registry.get("requests:bad-1")
    assert rec is not None and rec["state"] == "FAILED" and rec["attempts"] == 3
    assert rec["error"]["errorType"] == "ValueError"


def test_malformed_messages_are_dead_lettered_and_the_trigger_keeps_consuming(harness: FleetHarness) -> None:
    harness.write_config(triggers={
        "requests": {"source": f"kafka:///{harness.topic('requests')}"},
        "typed": {"source": f"kafka:///{harness.topic('typed')}", "function": "typed"},
    })  # fmt: skip
    harness.start()
    bad = {
        "malformed_json": b'{"function": "echo", "payload": ',
        "unknown_function": orjson.dumps({"function": "no_such_fn", "payload": {}}),
        "schema_mismatch": orjson.dumps({"payload": {"no": "function"}}),
        "oversize": orjson.dumps({"function": "echo", "payload": {"blob": "x" * 5000}}),
        "bad_id": orjson.dumps({"function": "echo", "payload": {}, "id": "has spaces/and slashes"}),
    }
    harness.produce("requests", list(bad.values()))
    harness.produce("typed", [orjson.dumps({"n": "not a number"})])
    harness.send("echo", {"after": "bad input"}, id="after-bad")
    harness.produce("typed", [orjson.dumps({"n": 7, "id": "typed-ok"})])

    dead = harness.records("dlq", len(bad) + 1)
    by_reason = {r["headers"]["reason"]: r for r in dead}
    assert set(by_reason) == set(bad)  # schema_mismatch comes twice: envelope and pydantic model
    for reason, original in bad.items():
        if reason != "schema_mismatch":
            assert by_reason[reason]["raw"] == original, reason
        assert by_reason[reason]["headers"]["detail"]
        assert by_reason[reason]["headers"]["source"].startswith("kafka:")
    assert sum(r["headers"]["reason"] == "schema_mismatch" for r in dead) == 2
    assert any("Typed" in r["headers"]["detail"] for r in dead)
    ok = {r["key"]: r["value"] for r in harness.records("success", 2)}
    assert ok["requests:after-bad"]["responsePayload"]["echo"] == {"after": "bad input"}
    assert ok["typed:typed-ok"]["responsePayload"] == {"square": 49}


def test_the_same_message_id_runs_once(harness: FleetHarness) -> None:
    harness.start()
    harness.send("echo", {"v": 1}, id="dup-1")
    first_run = lambda: (harness.registry.get("requests:dup-1") or {}).get("state") == "SUCCEEDED"  # noqa: E731
    harness.wait_for(first_run, what="first run")
    # Redelivered after its success, and twice in one batch: neither runs again.
    harness.send("echo", {"v": 1}, id="dup-1")
    harness.produce("requests", [orjson.dumps({"function": "echo", "payload": {"v": 2}, "id": "dup-2"})] * 2)
    harness.send("echo", {"v": 3}, id="marker")  # a later message, so the duplicates were surely consumed
    harness.records("success", 3)
    harness.wait_for(lambda: harness.runs("requests:marker") == 1, what="marker")
    records = harness.records("success", 3)
    assert sorted(r["key"] for r in records) == ["requests:dup-1", "requests:dup-2", "requests:marker"]
    assert harness.runs("requests:dup-1") == 1 and harness.runs("requests:dup-2") == 1


def test_worker_process_killed_mid_task_runs_again_with_one_success(harness: FleetHarness) -> None:
    harness.start()
    harness.send("slow", {"seconds": 2}, id="victim")
    pid = int(harness.wait_for(lambda: harness.redis.get("pid:requests:victim"), what="the task to start"))
    os.kill(pid, signal.SIGKILL)  # the pool process running the handler, mid-task
    harness.wait_for(lambda: (harness.registry.get("requests:victim") or {}).get("state") == "SUCCEEDED", what="re-run")
    records = [r for r in harness.records("success", 1) if r["key"] == "requests:victim"]
    assert len(records) == 1
    body = records[0]["value"]
    assert body["requestContext"]["approximateInvokeCount"] == 2
    assert body["responsePayload"] == {"slept": 2, "attempt": 2}
    assert harness.runs("requests:victim") == 2
    assert int(harness.redis.get("pid:requests:victim") or 0) != pid


def test_status_command_reads_the_registry(harness: FleetHarness) -> None:
    harness.start()
    harness.send("echo", {"hello": "status"}, id="st-1")
    harness.wait_for(lambda: (harness.registry.get("requests:st-1") or {}).get("state") == "SUCCEEDED", what="success")
    cmd = [sys.executable, "-m", "gpufleet", "status", "requests:st-1", "--config", str(harness.config)]
    as_json = subprocess.run([*cmd, "--json"], capture_output=True, env=harness.env(), check=True)
    record = orjson.loads(as_json.stdout)
    assert record["state"] == "SUCCEEDED" and record["function"] == "echo" and record["attempts"] == 1
    text = subprocess.run(cmd, capture_output=True, env=harness.env(), check=True).stdout.decode()
    assert "SUCCEEDED" in text and "echo" in text
    missing = subprocess.run(
        [*cmd[:-3], "nope", "--config", str(harness.config)], capture_output=True, env=harness.env()
    )
    assert missing.returncode == 1 and b"no task" in missing.stderr


def test_run_stops_cleanly_on_sigterm(harness: FleetHarness) -> None:
    harness.start()
    harness.send("echo", {"x": 1}, id="before-stop")
    harness.wait_for(lambda: harness.runs("requests:before-stop") == 1, what="a task")
    assert harness.stop() == 0


def test_time_limit_gives_timed_out_and_the_worker_serves_the_next_task(harness: FleetHarness) -> None:
    harness.start()
    harness.send("hang", {}, id="to-soft")  # raises out of sleep at the soft limit
    harness.send("hang", {"stubborn": True}, id="to-hard")  # ignores it: killed kill_grace_s later
    failures = {r["key"]: r for r in harness.records("failure", 2, timeout_s=90)}
    assert set(failures) == {"requests:to-soft", "requests:to-hard"}
    for task_id, record in failures.items():
        assert record["headers"]["condition"] == "TimedOut"
        assert record["value"]["responsePayload"]["errorType"] == "TimedOut"
        assert "ran past timeout_s (1 s)" in record["value"]["responsePayload"]["errorMessage"]
        rec = harness.registry.get(task_id)
        assert rec is not None and rec["state"] == "TIMED_OUT" and harness.runs(task_id) == 1
    harness.send("echo", {"after": "timeouts"}, id="after-timeouts")
    harness.wait_for(lambda: harness.runs("requests:after-timeouts") == 1, what="the next task")
