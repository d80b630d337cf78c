"""Failures that cannot succeed are not retried: they fail at once, and the error names the function and the cause."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpufleet.errors import ConfigError
from gpufleet.functions import function
from gpufleet.registry.messages import MessageFactory
from gpufleet.registry.model import NewTask
from tests.harness import FleetHarness


def test_a_result_json_cannot_hold_and_an_event_the_model_refuses_fail_at_once(harness: FleetHarness) -> None:
    harness.start()
    harness.send("unstorable", {}, id="unstorable-1")
    # An event that skipped intake's check (queued before the function's payload model changed, say).
    fleet = harness.fleet()
    message = MessageFactory(harness.prefix, 1.0).build(
        "typed-bad", fleet.functions["typed"], {"n": "not a number"}, {"source": "test"}
    )
    success, failure = f"kafka:///{harness.topic('success')}", f"kafka:///{harness.topic('failure')}"
    harness.registry.enqueue_many([NewTask(message, success, failure, 3, "test", time.time(), origin="test")])
    failures = {r["key"]: r["value"] for r in harness.records("failure", 2)}
    unstorable = failures["requests:unstorable-1"]
    assert unstorable["requestContext"]["approximateInvokeCount"] == 1 and harness.runs("requests:unstorable-1") == 1
    error = unstorable["responsePayload"]
    assert error["errorType"] == "ResultNotSerializable"
    assert "function 'unstorable' returned a dict that cannot be stored as JSON" in error["errorMessage"]
    assert error["stackTrace"] == []  # nothing in gpufleet's own code to point at
    typed = failures["typed-bad"]
    assert typed["requestContext"]["approximateInvokeCount"] == 1
    assert typed["responsePayload"]["errorType"] == "InvalidPayload"
    assert "function 'typed': the event does not match Typed" in typed["responsePayload"]["errorMessage"]
    assert harness.registry.get("typed-bad")["state"] == "FAILED"


def test_a_handler_that_cannot_take_event_and_ctx_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"one_arg\(event.*cannot be called as def handler\(event, ctx\)"):

        @function(name="one_arg")
        def one_arg(event: object) -> None: ...

    def flexible(event: object, ctx: object, extra: int = 0, *rest: object) -> None: ...

    function(name="flexible")(flexible)  # defaults and *args are fine

    (tmp_path / "workers").mkdir()
    (tmp_path / "workers" / "bad.py").write_text(
        "from gpufleet import function\n\n@function(name='bad')\ndef bad(event):\n    return event\n"
    )
    (tmp_path / "fleet.yaml").write_text("functions: [workers]\ntriggers: []\n")
    check = subprocess.run([sys.executable, "-m", "gpufleet", "check", "--config", str(tmp_path / "fleet.yaml")],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode != 0
    assert "bad.py" in check.stderr and "cannot be called as def handler(event, ctx)" in check.stderr
