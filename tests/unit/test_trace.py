"""W3C traceparent parsing and the task's child span (the end-to-end paths are in the trigger contract, the API and
the destination tests)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpufleet import trace

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_valid_and_invalid_traceparents() -> None:
    assert trace.parse(VALID) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01")
    assert trace.parse(VALID.encode()) == trace.parse(VALID)
    assert trace.parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more") is not None  # a later version
    for bad in ("", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", VALID.upper(), VALID + "-extra",
                "ff" + VALID[2:], "00-" + "0" * 32 + "-00f067aa0ba902b7-01", VALID[:36] + "0" * 16 + "-01",
                VALID.replace("-", "_"), "x" * 600, b"\xff\xfe"):  # fmt: skip
        assert trace.parse(bad) is None, bad


def test_a_task_is_a_new_span_of_the_callers_trace() -> None:
    child = trace.child(VALID)
    assert trace.parse(child) is not None
    trace_id, span_id, flags = trace.parse(child) or ("", "", "")
    assert (trace_id, flags) == ("4bf92f3577b34da6a3ce929d0e0e4736", "01") and span_id != "00f067aa0ba902b7"
    assert trace.child(VALID) != child
    assert trace.ids(child) == {"trace_id": trace_id, "span_id": span_id} and trace.ids(None) == {}


@given(st.one_of(st.none(), st.text(max_size=80), st.binary(max_size=80)))
def test_any_header_value_gives_a_valid_traceparent(value: str | bytes | None) -> None:
    assert trace.parse(trace.child(value)) is not None
