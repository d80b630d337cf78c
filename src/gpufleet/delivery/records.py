"""Callback records, shaped after AWS Lambda destination records so existing consumers understand them."""

from __future__ import annotations

import hashlib
import traceback
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import PurePath
from typing import Any

import orjson

from gpufleet.functions import FUNCTIONS_NAMESPACE, LATEST

VERSION = "1.0"
PREVIEW_CHARS = 512


class Condition(StrEnum):
    SUCCESS = "Success"
    RETRIES_EXHAUSTED = "RetriesExhausted"
    EVENT_AGE_EXCEEDED = "EventAgeExceeded"
    TIMED_OUT = "TimedOut"
    CANCELLED = "Cancelled"


def function_arn(fleet: str, function: str, version: str = LATEST) -> str:
    """A function's stable resource name, shaped as Lambda's so that its parts split the same way:
    ``arn:gpufleet:gpufleet::<fleet>:function:<name>:<version>`` (no region: a function spans the fleet's pools)."""
    return f"arn:gpufleet:gpufleet::{fleet}:function:{function}:{version}"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_payload(exc: BaseException, error_type: str | None = None) -> dict[str, Any]:
    """``errorType``, ``errorMessage`` and ``stackTrace``, as Lambda reports a function error. The trace names each
    file from its package (``celery/app/trace.py``) or its functions folder (``workers/enhance.py``), never where
    the worker is installed: records leave the fleet."""
    trace = traceback.TracebackException.from_exception(exc)
    _relativize(trace, _module_paths(exc))
    return {
        "errorType": error_type or type(exc).__name__,
        "errorMessage": str(exc),
        "stackTrace": list(trace.format())[-20:],
    }


def _module_paths(exc: BaseException) -> dict[str, str]:
    """Each file of the traceback (and of its causes), as its module's dotted name says it sits in its package."""
    paths: dict[str, str] = {}
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        for frame, _ in traceback.walk_tb(current.__traceback__):
            path = frame.f_code.co_filename
            if path not in paths:
                paths[path] = _in_package(path, str(frame.f_globals.get("__name__", "")))
        pending += [current.__cause__, current.__context__]
    return paths


def _in_package(path: str, module: str) -> str:
    parts = PurePath(path).parts
    if module.startswith(FUNCTIONS_NAMESPACE):  # a function file: its folder and its name
        return "/".join(parts[-2:])
    depth = module.count(".") + (1 if parts[-1] == "__init__.py" else 0)  # folders between the root and the file
    return "/".join(parts[-(depth + 1) :]) if module and module != "__main__" else parts[-1]


def _relativize(trace: traceback.TracebackException, paths: dict[str, str], seen: set[int] | None = None) -> None:
    seen = set() if seen is None else seen
    if id(trace) in seen:
        return
    seen.add(id(trace))
    for frame in trace.stack:
        frame.filename = paths.get(frame.filename, PurePath(frame.filename).name)
    for chained in (trace.__cause__, trace.__context__):
        if chained is not None:
            _relativize(chained, paths, seen)


def callback_record(
    *,
    task_id: str,
    function: str,
    condition: Condition,
    attempts: int,
    event: Any,
    worker: str,
    gpu: str,
    started_at: float | None,
    finished_at: float,
    response: Any,
    fleet: str,
    version: str = LATEST,
    outputs: list[str] | None = None,
    handled: bool = False,
) -> dict[str, Any]:
    """Build the record; ``response`` is the handler's result on success, else an :func:`error_payload`.

    As Lambda's: ``statusCode`` 200 when a handler ran (``started_at``), whatever it did, and ``functionError``
    ``Unhandled`` when it raised (or timed out, or its worker died), ``Handled`` when it returned an exception for
    the event (a batch function's way to fail one event), absent on success. A record of an event no handler ran
    (it expired or was cancelled while it waited) has neither, nor ``executedVersion``. ``fleet`` (the key prefix)
    and ``version`` name the function in ``functionArn``.
    """
    invoked = started_at is not None
    response_context: dict[str, Any] = {"statusCode": 200, "executedVersion": version} if invoked else {}
    if invoked and condition is not Condition.SUCCESS:
        response_context["functionError"] = "Handled" if handled else "Unhandled"
    record = {
        "version": VERSION,
        "timestamp": iso(finished_at),
        "requestContext": {
            "requestId": task_id,
            "functionArn": function_arn(fleet, function, version),
            "condition": condition.value,
            "approximateInvokeCount": attempts,
            "function": function,
            "functionVersion": version,
        },
        "requestPayload": event,
        "responseContext": {
            **response_context,
            "worker": worker,
            "gpu": gpu,
            "startedAt": iso(started_at) if started_at else None,
            "finishedAt": iso(finished_at),
            "durationMs": round((finished_at - started_at) * 1000, 3) if started_at else None,
        },
        "responsePayload": response,
    }
    if outputs:  # objects the handler uploaded (ctx.upload), as s3:// URIs
        record["responseContext"]["outputs"] = outputs
    return record


def fit_record(record: dict[str, Any], limit: int) -> bytes:
    """Serialise a record, keeping it within ``limit`` bytes so that its destination can always accept it.

    An oversized ``requestPayload`` is replaced first, then an oversized ``responsePayload``, each by a marker that
    says what was there: ``{"truncated": true, "originalBytes": n, "sha256": ..., "preview": first characters}``.
    The task's record in the registry keeps the full result; the event is what the producer sent.
    """
    value = orjson.dumps(record)
    for field in ("requestPayload", "responsePayload"):
        if len(value) <= limit:
            break
        original = orjson.dumps(record[field])
        if len(original) <= 2 * PREVIEW_CHARS:
            continue
        record = {**record, field: truncated(original)}
        value = orjson.dumps(record)
    return value


def truncated(original: bytes) -> dict[str, Any]:
    """The marker that stands in for a value too large to carry."""
    return {
        "truncated": True,
        "originalBytes": len(original),
        "sha256": hashlib.sha256(original).hexdigest(),
        "preview": original[:PREVIEW_CHARS].decode(errors="replace"),
    }
