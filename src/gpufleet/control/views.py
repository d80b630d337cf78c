"""What the control plane answers: a task's public view (whole, or as a listing shows it), a retry's outcome, listing
cursors, a served function, and the GPU inventory by pool and model."""

from __future__ import annotations

import base64
from typing import Any

import orjson

from gpufleet.delivery.records import iso
from gpufleet.errors import ConflictError, InvalidRequestError, NotFoundError
from gpufleet.functions import Function
from gpufleet.registry.jobs import job_info
from gpufleet.registry.messages import DEFAULT_PRIORITY, function_queue
from gpufleet.registry.model import GPU_MEMORY_WAIT, State, usage_of
from gpufleet.scheduling.estimate import has_room
from gpufleet.settings import FleetSettings

RETRIABLE = frozenset({State.FAILED, State.TIMED_OUT, State.CANCELLED, State.EXPIRED})
TIMES = (
    "created_at",
    "queued_at",
    "started_at",
    "finished_at",
    "retry_at",
    "cancel_requested_at",
    "lease_until",
    "checkpoint_at",
)


def listed(view: dict[str, Any]) -> dict[str, Any]:
    """A task as a listing shows it: its result's size instead of the result (108 results made a listing of 15.6 MB),
    and its error without the stack trace. One task's GET has the rest."""
    result, view["result"] = view["result"], None
    view["result_bytes"] = None if result is None else len(orjson.dumps(result))
    for key in ("error", "last_error"):
        if view[key]:
            view[key] = {k: v for k, v in view[key].items() if k != "stackTrace"}
    return view


def task_view(record: dict[str, Any]) -> dict[str, Any]:
    """The public shape of a task record: no owner token, no envelope; times as ISO 8601 strings."""
    view: dict[str, Any] = {
        "id": record["id"],
        "function": record["function"],
        "state": record["state"],
        "attempts": int(record.get("attempts", 0)),
        "max_attempts": int(record.get("max_attempts", 1)),
        "gpu_retries": int(record.get("gpu_retries", 0)),
        "checkpoints": int(record.get("checkpoints", 0)),
        "preemptions": int(record.get("preemptions", 0)),
        "priority": int(record.get("priority", DEFAULT_PRIORITY)),
        "progress": {"fraction": float(record.get("progress", 0) or 0), "message": record.get("progress_message", "")},
        "source": record.get("source"),
        "worker": record.get("worker") or None,
        "gpu": record.get("gpu") or None,
        "condition": record.get("condition"),
        "result": record.get("result"),
        "error": record.get("error"),
        "last_error": record.get("last_error"),
        "queue": record.get("queue"),
        "cancel_requested": record.get("cancel") == "1",
        "waiting_for": None,
        "usage": usage_of(record),
    }
    last = view["last_error"]
    if view["state"] == State.QUEUED and isinstance(last, dict) and last.get("errorType") == GPU_MEMORY_WAIT:
        view["waiting_for"] = last.get("errorMessage")
    for key in TIMES:
        value = record.get(key)
        view[key] = iso(float(value)) if value else None
    return view


def retried(task_id: str, outcome: str, state: str, now: State) -> dict[str, Any]:
    """What a retry answers, from the registry's outcome: queued (now in state ``now``), or why not."""
    if outcome == "missing":
        raise NotFoundError("task_not_found", f"no task {task_id!r}")
    if outcome == "conflict":
        allowed = ", ".join(sorted(s.value for s in RETRIABLE))
        raise ConflictError("not_retriable", f"task {task_id!r} is {state}; only {allowed} tasks can be retried")
    return {"id": task_id, "outcome": "queued", "previous_state": state, "state": now.value}


def parse_state(value: str) -> State:
    try:
        return State(value.upper())
    except ValueError:
        choices = [s.value for s in State]
        raise InvalidRequestError("bad_state", f"unknown state {value!r}; use one of {choices}") from None


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not raw.startswith("s"):
            raise ValueError(raw)
        return int(raw[1:])
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("bad_cursor", "cursor is not one this API returned") from None


def group_gpus(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The inventory by pool and GPU model: per pair, the GPUs, how many run a task and how many are free, the stale
    ones (not refreshed lately: their host may be gone) and the hosts. A host in several pools counts in each."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for e in entries:
        for pool in e.get("pools") or ["default"]:
            model = str(e.get("model") or "unknown")
            g = groups.setdefault(
                (pool, model),
                {"pool": pool, "model": model, "gpus": 0, "busy": 0, "idle": 0, "stale": 0, "hosts": set()},
            )
            g["gpus"] += 1
            if e.get("stale"):
                g["stale"] += 1
                continue
            g["hosts"].add(e.get("host") or str(e.get("worker", "")).partition("@")[2])
            g["busy" if e.get("task_id") else "idle"] += 1
    return [{**g, "hosts": sorted(g["hosts"])} for _, g in sorted(groups.items())]


def function_view(
    settings: FleetSettings, fn: Function, versions: list[dict[str, Any]] | None, aliases: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """A served function as ``GET /v1/functions`` lists it; ``versions`` None when Redis could not be read."""
    return {
        "name": fn.name,
        "version": fn.version,
        "state": versions[0]["state"] if versions else None,  # the declared version's
        "versions": versions,
        "aliases": aliases,
        "gpu": {
            "model": fn.gpu.model,
            "count": fn.gpu.count,
            "pools": list(fn.gpu.pools),
            "memory_gb": fn.gpu.memory_gb,
        },
        "queue": function_queue(settings.redis.key_prefix, fn),
        "timeout_s": fn.timeout_s,
        "max_attempts": fn.max_attempts,
        "backoff_s": fn.backoff_s,
        "backoff_max_s": fn.backoff_max_s,
        "max_event_age_s": fn.max_event_age_s,
        "retention_s": fn.retention_s or settings.defaults.retention_s,
        "payload_schema": fn.payload.model_json_schema() if fn.payload else None,
        "job": None if fn.shards is None else job_info(fn.shards),
    }


def served(queue: str | None, live: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether a live GPU worker (of the inventory's ``live`` entries) reads ``queue``; when none does, a warning that
    says so (a task there waits until one starts, or until its max_event_age_s)."""
    if any(queue in e.get("queues", []) for e in live):
        return {"served": True}
    return {"served": False, "warning": f"no live worker consumes {queue}"}


def memory_wait(need_mb: int, queue: str | None, live: list[dict[str, Any]]) -> str | None:
    """Why a QUEUED task that needs ``need_mb`` of GPU memory waits, as the live GPUs that read its queue say (they
    are all large enough: a smaller one never reads it), or None when one of them has room and is idle."""
    readers = [e for e in live if queue in e.get("queues", [])]
    if not readers:
        return None  # the "served" warning says it
    roomy = [e for e in readers if has_room(e, need_mb)]
    if not roomy:
        names = ", ".join(str(e["worker"]) for e in readers)
        return f"waits for GPU memory: it needs {need_mb} MiB; other processes hold too much of {names}"
    if all(e.get("task_ids") for e in roomy):
        names = ", ".join(str(e["worker"]) for e in roomy)
        return f"waits for a GPU with {need_mb} MiB of room: those that have it are busy ({names})"
    return None
