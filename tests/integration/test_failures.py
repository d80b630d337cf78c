"""Failures that cannot succeed are not retried: they fail at once, and the error names the function and the cause."""

from __future__ import annotations

import time

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
