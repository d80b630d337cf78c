"""Every line a gpufleet process writes is a log line: no colours in a file, warnings and a handler's print() as
structured lines, not loose text."""

from __future__ import annotations

import json

from tests.harness import FleetHarness


def test_run_says_ready_once_and_what_a_handler_prints_becomes_a_log_line(harness: FleetHarness) -> None:
    harness.start()
    harness.send("echo", {"print": "hello from a handler"}, id="printer")
    harness.wait_for(lambda: (harness.registry.get("requests:printer") or {}).get("state") == "SUCCEEDED",
                     what="the task")  # fmt: skip
    [ready] = harness.wait_for(lambda: [json.loads(line) for line in harness.log_text().splitlines()
                                        if '"event":"ready"' in line], what="the ready line")  # fmt: skip
    assert len(ready["gpus"]) == 1 and ready["triggers"] == ["requests"] and ready["api"] is None
    harness.stop()
    lines = harness.log_text().splitlines()
    assert "hello from a handler" not in lines  # not loose on stdout
    printed = [json.loads(line) for line in lines if '"printed"' in line]
    assert [p["text"] for p in printed] == ["hello from a handler"] and printed[0]["worker"]
    # Celery's notices too: no multi-line root warning, no plain "Warm shutdown" line.
    loose = [line for line in lines if line and not line.startswith("{")]
    assert not loose, loose[:5]
    assert "SecurityWarning" not in harness.log_text()
