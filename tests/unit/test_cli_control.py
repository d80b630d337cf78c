"""The control-plane CLI (invoke, status, cancel, retry, tasks, queue, functions, gpus), run as a real process
against real Redis; one test without a fleet running, one with it."""

from __future__ import annotations

import io
from typing import Any

import pytest

from gpufleet.cli.output import table
from gpufleet.cli.progress import ProgressDisplay, bar_line, follow
from gpufleet.cli.tasks import read_payload
from gpufleet.errors import InvalidRequestError


def view(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "t1", "function": "f", "state": "RUNNING", "attempts": 1, "max_attempts": 3,
                            "progress": {"fraction": 0.5, "message": "half way"},
                            "started_at": "2024-01-01T00:00:00.000Z"}  # fmt: skip
    return {**base, **fields}


T0 = 1704067200.0  # 2024-01-01T00:00:00Z


def test_progress_bar_line_and_display() -> None:
    assert bar_line(view(), now=T0 + 3.2, width=10) == "[#####.....]  50%  half way  (RUNNING 3.2s)"
    long = view(attempts=2, progress={"fraction": 1, "message": "x" * 300})
    line = bar_line(long, now=T0 + 1, columns=80)
    assert len(line) == 79 and line.startswith("[" + "#" * 20 + "] 100%  xxx") and line.count("x") == 20
    assert line.endswith("x…  (RUNNING 1.0s, attempt 2/3)")
    assert bar_line(long, now=T0 + 1, columns=60) == "[" + "#" * 20 + "] 100%  (RUNNING 1.0s, attempt 2/3)"
    assert len(bar_line(long, now=T0 + 1, columns=20)) == 19
    queued = bar_line(view(state="QUEUED", progress={}, started_at=None, created_at="2024-01-01T00:00:01Z"), T0 + 2)
    assert queued == "[" + "." * 20 + "]   0%  (QUEUED 1.0s)"
    assert "\n" not in bar_line(view(progress={"fraction": 0.1, "message": "two\nlines\r"}), T0)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    views = iter([view(), view(), view(state="SUCCEEDED", finished_at="2024-01-01T00:00:04Z")])
    final, timed_out = follow(lambda: next(views), {"SUCCEEDED"}, ProgressDisplay(tty, columns=80), poll_s=0)
    assert final["state"] == "SUCCEEDED" and not timed_out
    out = tty.getvalue()
    assert out.count("\r") == 3 and out.endswith("(SUCCEEDED 4.0s)" + " " * 5 + "\n") and "\n" not in out[:-1]

    pipe = io.StringIO()
    display = ProgressDisplay(pipe)
    for v in (view(), view(), view(progress={"fraction": 0.75, "message": ""})):
        display.update(v, now=T0 + 1)
    display.close()
    assert pipe.getvalue().splitlines() == ["[##########..........]  50%  half way  (RUNNING 1.0s)",
                                            "[###############.....]  75%  (RUNNING 1.0s)"]  # fmt: skip
    still, timed_out = follow(lambda: view(), {"SUCCEEDED"}, None, timeout_s=0.01, poll_s=0.005)
    assert timed_out and still["state"] == "RUNNING"


def test_payload_parsing_and_tables() -> None:
    assert read_payload('{"a": [1, 2]}') == {"a": [1, 2]}
    assert read_payload("-", io.BytesIO(b"[1]")) == [1]
    with pytest.raises(InvalidRequestError, match="not valid JSON") as err:
        read_payload("{nope")
    assert err.value.code == "bad_payload"
    with pytest.raises(InvalidRequestError, match="cannot read --payload file"):
        read_payload("@/nonexistent/payload.json")
    assert table(["a", "bee"], [["x", None], ["long\nvalue", 3]]).splitlines() == ["A           BEE", "x           -",
                                                                                  "long value  3"]  # fmt: skip
    assert table(["a"], [], "nothing") == "nothing"
