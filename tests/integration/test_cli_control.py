"""The control-plane CLI (invoke, status, cancel, retry, tasks, queue, functions, gpus), run as a real process
against real Redis; one test without a fleet running, one with it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from gpufleet.control.plane import ControlPlane
from tests.harness import FleetHarness

TEST_FUNCTIONS = {"echo", "always_fail", "slow", "typed", "hang"}


def cli(
    h: FleetHarness, *args: str, stdin: str | None = None, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gpufleet", *args, "--config", str(h.config)]
    io_args: dict[str, Any] = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run(cmd, capture_output=True, text=True, env=h.env(), timeout=timeout_s, **io_args)


def cli_json(h: FleetHarness, *args: str, code: int = 0, stdin: str | None = None) -> Any:
    result = cli(h, *args, "--json", stdin=stdin)
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def state(h: FleetHarness, task_id: str) -> str | None:
    record = h.registry.get(task_id)
    return None if record is None else str(record["state"])


def test_control_commands_without_a_running_fleet(harness: FleetHarness) -> None:
    h = harness
    functions = cli_json(h, "functions")
    assert {f["name"] for f in functions} >= TEST_FUNCTIONS
    echo = next(f for f in functions if f["name"] == "echo")
    assert echo["max_attempts"] == 3 and echo["queue"] and echo["gpu"]["model"]
    assert next(f for f in functions if f["name"] == "typed")["payload_schema"]["properties"]["n"]["type"] == "integer"
    assert echo["version"] == "$LATEST" and next(f for f in functions if f["name"] == "batched")["version"] == "7"
    assert echo["state"] == "INACTIVE"  # declared, and no worker serves it: none runs here
    out = cli(h, "functions").stdout
    assert out.splitlines()[0].split()[:6] == ["NAME", "VERSIONS", "ALIASES", "GPU", "QUEUE", "TIMEOUT"]
    assert any(line.split()[:3] == ["batched", "7*", "INACTIVE"] for line in out.splitlines()), out
    assert "always_fail" in out

    # Bad input: a clear one-line error on stderr, the JSON error document on stdout with --json.
    unknown = cli(h, "invoke", "nope", "--payload", "{}")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.startswith("gpufleet: error: no function 'nope'")
    assert cli_json(h, "invoke", "nope", code=1)["error"]["code"] == "function_not_found"
    bad = cli(h, "invoke", "echo", "--payload", "{not json")
    assert bad.returncode == 2 and "--payload is not valid JSON" in bad.stderr and "Traceback" not in bad.stderr
    assert cli_json(h, "invoke", "typed", "--payload", '{"n": "x"}', code=2)["error"]["code"] == "schema_mismatch"
    assert cli_json(h, "status", "no-such-task", code=1)["error"]["code"] == "task_not_found"
    assert cli(h, "retry", "no-such-task").returncode == 1

    # --payload @file, --payload - (stdin), and an idempotency key used twice.
    (h.dir / "payload.json").write_text('{"from": "file"}')
    from_file = cli(h, "invoke", "echo", "--payload", f"@{h.dir / 'payload.json'}")
    assert from_file.returncode == 0, from_file.stderr
    file_id = from_file.stdout.strip()
    from_stdin = cli_json(h, "invoke", "echo", "--payload", "-", stdin='{"from": "stdin"}')
    assert from_stdin["created"] is True
    for task_id, event in ((file_id, {"from": "file"}), (from_stdin["id"], {"from": "stdin"})):
        assert (h.registry.get(task_id, event=True) or {}).get("event") == event
    first = cli_json(h, "invoke", "echo", "--idempotency-key", "order-42")
    again = cli(h, "invoke", "echo", "--idempotency-key", "order-42", "--json")
    assert json.loads(again.stdout) == {"id": first["id"], "created": False} and first["created"] is True
    assert "already exists" in again.stderr
    echo_ids = [first["id"], from_stdin["id"], file_id]  # newest first

    status = cli_json(h, "status", file_id)
    assert status["state"] == "QUEUED" and status["function"] == "echo" and status["created_at"].endswith("Z")
    assert status["progress"] == {"fraction": 0.0, "message": ""} and "owner" not in status
    human = cli(h, "status", file_id).stdout
    assert "state      QUEUED" in human and "position   1 of 3 in queue" in human

    # Listing: pages, cursor, filters.
    page = cli_json(h, "tasks", "--function", "echo", "--limit", "2")
    assert [t["id"] for t in page["items"]] == echo_ids[:2] and page["next_cursor"]
    rest = cli_json(h, "tasks", "--function", "echo", "--limit", "2", "--cursor", page["next_cursor"])
    assert [t["id"] for t in rest["items"]] == echo_ids[2:] and rest["next_cursor"] is None
    listing = cli(h, "tasks", "--function", "echo", "--limit", "2").stdout.splitlines()
    assert listing[0].split() == ["ID", "FUNCTION", "STATE", "ATTEMPTS", "PROGRESS", "CREATED", "WORKER"]
    assert listing[1].split()[:4] == [echo_ids[0], "echo", "QUEUED", "0/3"]
    assert listing[-1] == f"more: gpufleet tasks --function echo --limit 2 --cursor {page['next_cursor']}"
    assert cli_json(h, "tasks", "--state", "bogus", code=2)["error"]["code"] == "bad_state"

    # Cancel a queued task; cancelling it again is a no-op, not an error; then retry it.
    assert cli_json(h, "cancel", file_id) == {"id": file_id, "outcome": "cancelled", "state": "CANCELLED"}
    assert cli_json(h, "status", file_id)["state"] == "CANCELLED"
    noop = cli(h, "cancel", file_id)
    assert noop.returncode == 0 and noop.stdout.startswith(f"noop: {file_id} already finished (CANCELLED)")
    assert [t["id"] for t in cli_json(h, "tasks", "--state", "cancelled")["items"]] == [file_id]
    retried = cli_json(h, "retry", file_id)
    assert retried == {"id": file_id, "outcome": "queued", "previous_state": "CANCELLED", "state": "QUEUED"}
    conflict = cli(h, "retry", file_id)
    assert conflict.returncode == 1 and "only CANCELLED, EXPIRED, FAILED, TIMED_OUT tasks" in conflict.stderr

    # No fleet: --wait gives up at --timeout with exit 3, having shown progress lines (stderr is not a TTY).
    waited = cli(h, "invoke", "echo", "--wait", "--timeout", "1")
    assert waited.returncode == 3, waited.stderr
    assert "state      QUEUED" in waited.stdout and "timed out after 1s" in waited.stderr
    assert "[....................]   0%  (QUEUED " in waited.stderr

    queue = cli_json(h, "queue", "echo")
    assert queue["function"] == "echo" and queue["length"] == 4
    assert {k: v for k, v in queue["counts"].items() if v} == {"QUEUED": 4}
    queues = cli_json(h, "queue")
    assert {q["function"] for q in queues} >= TEST_FUNCTIONS and queue in queues
    rows = cli(h, "queue").stdout.splitlines()
    assert rows[0].split()[:5] == ["FUNCTION", "QUEUE", "LENGTH", "VERSIONS", "RUNNING"]
    assert next(r for r in rows if r.startswith("echo ")).split()[2:6] == ["4", "$LATEST:", "4", "0"]

    assert cli_json(h, "gpus") == []
    assert "no GPUs reported yet" in cli(h, "gpus").stdout


def test_invoke_wait_cancel_retry_and_gpus_on_a_running_fleet(harness: FleetHarness) -> None:
    h = harness
    h.write_config(worker={"cancel_grace_s": 1, "virtual_gpus": 2})
    h.start()

    ok = cli(h, "invoke", "echo", "--payload", '{"a": 1}', "--wait", "--json")
    assert ok.returncode == 0, f"{ok.stderr}\n{h.log_text()[-4000:]}"
    done = json.loads(ok.stdout)
    assert done["state"] == "SUCCEEDED" and done["result"] == {"echo": {"a": 1}, "attempt": 1}
    assert done["created"] is True and done["finished_at"] and done["worker"]
    assert "(SUCCEEDED " in ok.stderr.splitlines()[-1]
    noop = cli_json(h, "cancel", done["id"])
    assert noop["outcome"] == "noop" and noop["state"] == "SUCCEEDED"

    failed = cli(h, "invoke", "always_fail", "--wait")
    assert failed.returncode == 1, failed.stderr
    assert "state      FAILED (RetriesExhausted)" in failed.stdout
    assert "error      ValueError: boom on attempt 3" in failed.stdout
    failed_id = failed.stdout.split()[1]
    again = cli(h, "retry", failed_id, "--wait", "--json", "--quiet")
    assert again.returncode == 1 and again.stderr == ""
    assert json.loads(again.stdout)["state"] == "FAILED" and h.runs(failed_id) == 6

    # Both worker slots busy: a new task waits in the queue, and cancelling it there means it never runs.
    # 30 s: longer than the four commands below take on a loaded machine (each a fresh process; 20 s was not, once).
    slow = [cli_json(h, "invoke", "slow", "--payload", '{"seconds": 30}')["id"] for _ in range(2)]
    # Both handlers started: RUNNING alone may be a task claimed ahead, waiting behind the other on one slot.
    h.wait_for(lambda: all(h.runs(i) == 1 for i in slow), what="both slots busy")
    queued = cli_json(h, "invoke", "echo")["id"]
    assert cli_json(h, "cancel", queued)["outcome"] == "cancelled"
    running = cli(h, "status", slow[0]).stdout
    assert "state      RUNNING" in running and "progress   [....................]   0%  (RUNNING " in running

    gpus = h.wait_for(lambda: cli_json(h, "gpus"), timeout_s=15, what="the GPU inventory")
    assert len(gpus) == 2 and all(g["virtual"] and not g["stale"] and g["worker"] for g in gpus)
    assert {g["task_id"] for g in gpus} <= {*slow, None}
    table_rows = cli(h, "gpus").stdout.splitlines()  # by pool and model, then each GPU
    assert table_rows[0].split() == ["POOL", "MODEL", "GPUS", "BUSY", "IDLE", "STALE", "HOSTS"]
    assert table_rows[1].split()[:3] == ["default", "virtual", "2"]
    assert table_rows[3].split() == ["WORKER", "INDEX", "MODEL", "POOLS", "MEMORY", "UTIL", "TASK", "STATE"]

    watched = cli(h, "status", slow[1], "--watch")
    assert watched.returncode == 0 and "state      SUCCEEDED" in watched.stdout
    assert h.runs(queued) == 0 and cli_json(h, "status", queued)["state"] == "CANCELLED"

    # A running task that ignores the cancel is asked to stop, then killed after cancel_grace_s.
    stubborn = cli_json(h, "invoke", "slow", "--payload", '{"seconds": 60}')["id"]
    h.wait_for(lambda: state(h, stubborn) == "RUNNING", what="the slow task to start")
    cancelling = cli(h, "cancel", stubborn)
    assert cancelling.returncode == 0 and cancelling.stdout.startswith(f"cancelling: {stubborn} is running")
    end = cli(h, "status", stubborn, "--watch", "--timeout", "30", "--json")
    assert end.returncode == 1 and json.loads(end.stdout)["state"] == "CANCELLED"

    summary = cli_json(h, "queue", "slow")
    assert summary["length"] == 0 and summary["summary"]["completed"] == 2 and summary["summary"]["cancelled"] == 1


@pytest.mark.parametrize(
    "verb",
    [
        ["tasks"],
        ["status", "x"],
        ["queue"],
        ["queue", "echo"],
        ["alias", "echo"],
        ["alias", "echo", "prod", "1=1"],
        ["cancel", "x"],
        ["retry", "x"],
        ["invoke", "echo"],
        ["gpus"],
        ["parked"],
    ],
    ids=" ".join,
)
def test_an_unreachable_redis_is_one_line_with_what_to_check_and_exit_4(harness: FleetHarness, verb: list[str]) -> None:
    """Every verb that reads Redis (``queue`` printed a traceback and exited 1; ``alias`` said "no aliases")."""
    harness.write_config(redis={"url": "redis://127.0.0.1:1/0"})
    result = cli(harness, *verb)
    assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("gpufleet: error: cannot reach Redis") and "GPUFLEET_REDIS__URL" in line
    assert result.stdout == ""
    assert cli_json(harness, *verb, code=4)["error"]["code"] == "broker_error"


def test_control_commands_need_no_delivery_secret(harness: FleetHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signed webhook destination's secret is the dispatcher's: status, invoke, queue... work without it, while
    ``check`` (what a role loads) still says it is missing, with a fix that never mints a secret for one side only."""
    monkeypatch.delenv("GPUFLEET_TEST_HOOK_SECRET", raising=False)
    h = harness
    hook = "https://hooks.example.com/done#secret_env=GPUFLEET_TEST_HOOK_SECRET"
    h.write_config(triggers={"requests": {"source": f"kafka:///{h.topic('requests')}", "on_success": hook}},
                   defaults={"on_failure": hook})  # fmt: skip
    created = cli_json(h, "invoke", "echo", "--payload", '{"n": 1}')
    assert cli_json(h, "status", created["id"])["state"] == "QUEUED"
    for verb in (["queue"], ["tasks"], ["functions"], ["alias", "echo"], ["cancel", created["id"]]):
        done = cli(h, *verb)
        assert done.returncode == 0 and "GPUFLEET_TEST_HOOK_SECRET" not in done.stderr, (verb, done.stderr)
    check = cli(h, "check")
    assert check.returncode == 2 and "GPUFLEET_TEST_HOOK_SECRET is not set" in check.stderr, check.stderr
    assert "$(gpufleet token)" not in check.stderr and "the same value to both sides" in check.stderr


def test_invoke_takes_a_priority_and_refuses_one_out_of_range(harness: FleetHarness) -> None:
    """No worker runs: the task waits, with the priority it was given, ahead of an earlier one of a lower one."""
    low = cli_json(harness, "invoke", "echo", "--payload", '{"n": 1}')
    high = cli_json(harness, "invoke", "echo", "--payload", '{"n": 2}', "--priority", "8")
    assert harness.registry.get(high["id"])["priority"] == 8 and harness.registry.get(low["id"])["priority"] == 4
    assert ControlPlane(harness.fleet()).position(high["id"])["position"] == 1
    bad = cli(harness, "invoke", "echo", "--payload", "{}", "--priority", "10")
    assert bad.returncode == 2 and "--priority: invalid choice: 10" in bad.stderr, bad.stderr
