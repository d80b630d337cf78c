"""W3C trace context (https://www.w3.org/TR/trace-context/): one trace from the event to its callback record.

A ``traceparent`` header on a Kafka or AMQP message, or an HTTP request (invoke, webhook), names the caller's trace
and span. The task is a child span in the same trace: same trace id, a span id of its own, the caller's flags. An
event without one (or with one that is not valid, which the spec says to ignore) starts a new trace. The task's
``traceparent`` travels in its meta to the worker (its log lines carry ``trace_id`` and ``span_id``, and handlers
read ``ctx.traceparent``), and its callback records carry it as their ``traceparent`` header, so whatever consumes
them continues the same trace.
"""

from __future__ import annotations

import random
import re

HEADER = "traceparent"
# version 00 exactly; a later version may add fields after ours (the spec: parse the first four, ignore the rest).
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def parse(value: str | bytes | None) -> tuple[str, str, str] | None:
    """(trace id, parent span id, flags) of a valid ``traceparent``, else None."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    if not value or len(value) > 512:
        return None
    m = _TRACEPARENT.match(value.strip())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, flags


def child(parent: str | bytes | None) -> str:
    """The task's own ``traceparent``: a new span in the caller's trace, or in a new trace (sampled) if the
    caller sent none that is valid."""
    # Ids need to be unique, not secret: Python's generator, as OpenTelemetry's SDK uses (cheaper than os.urandom,
    # once per message a trigger takes in; the random module reseeds itself in a forked child). Both ids from one
    # call; an all-zero id (invalid) has odds of 2^-64.
    fresh = random.randbytes(24).hex()
    found = parse(parent) if parent is not None else None
    trace_id, flags = (found[0], found[2]) if found else (fresh[:32], "01")
    return f"00-{trace_id}-{fresh[32:]}-{flags}"


def ids(traceparent: str | None) -> dict[str, str]:
    """``{"trace_id", "span_id"}`` for log lines; empty for a task made before tasks carried one."""
    found = parse(traceparent)
    return {"trace_id": found[0], "span_id": found[1]} if found else {}
