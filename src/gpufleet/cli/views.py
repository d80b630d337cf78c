"""How ``gpufleet status`` shows a task: its fields one per line, and for a job its shards, one per line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from gpufleet.cli.output import one_line, table
from gpufleet.cli.progress import bar_line

if TYPE_CHECKING:
    from gpufleet.control.plane import ControlPlane


def render_status(view: dict[str, Any], plane: ControlPlane | None = None) -> str:
    """The human form of a task view; a QUEUED task also shows its place in the queue (one more read)."""
    lines: list[tuple[str, object]] = [("task", view["id"]), ("function", view["function"])]
    state = view["state"]
    if view.get("condition") and view["condition"] != "Success":
        state = f"{state} ({view['condition']})"
    lines += [("state", state), ("attempts", f"{view.get('attempts', 0)}/{view.get('max_attempts', '?')}")]
    for key in ("created_at", "queued_at", "started_at", "finished_at", "retry_at"):
        if view.get(key):
            lines.append((key.removesuffix("_at").replace("_", " "), view[key]))
    if view.get("cancel_requested"):
        lines.append(("cancel", f"requested at {view.get('cancel_requested_at') or '?'}"))
    if view.get("worker"):
        lines.append(("worker", f"{view['worker']} ({view.get('gpu') or '?'})"))
    if view.get("pool"):
        lines.append(("pool", f"{view['pool']}{' (overflowed: not its first pool)' if view.get('overflowed') else ''}"))
    if view["state"] == "QUEUED" and plane is not None:
        pos = plane.position(view["id"])
        if pos.get("position"):
            lines.append(("position", f"{pos['position']} of {pos['queue_length']} in queue {pos['queue']}"))
        elif pos.get("retry_at"):
            lines.append(("position", f"waiting to retry at {pos['retry_at']}"))
    if view.get("warning"):
        lines.append(("warning", view["warning"]))
    if view.get("job"):
        lines.append(("job", f"{view['job']['id']} (shard {view['job']['index']})"))
    if view.get("phase"):
        lines.append(("phase", view["phase"]))
    if view["state"] == "RUNNING":
        lines.append(("progress", bar_line(view)))
    shards = view.get("shards")
    if shards:
        lines.append(("shards", f"{shards['done']}/{shards['total']} done: {shard_counts(shards)}"))
    if view.get("result") is not None:
        lines.append(("result", orjson.dumps(view["result"]).decode()[:2000]))
    for key, label in (("error", "error"), ("last_error", "last error")):
        err = view.get(key)
        if err and (key == "error" or view["state"] not in ("FAILED", "TIMED_OUT", "CANCELLED", "EXPIRED")):
            lines.append((label, _error_text(err)))
    text = "\n".join(f"{label:<10} {one_line(value)}" for label, value in lines)
    return text + ("\n\n" + shard_table(shards["items"]) if shards else "")


def shard_counts(shards: dict[str, Any] | None) -> str:
    """A job's shards per state, from its view's ``shards``: ``"5 QUEUED, 2 RUNNING, 1 SUCCEEDED"``."""
    return ", ".join(f"{n} {state}" for state, n in sorted((shards or {}).get("counts", {}).items()))


def shard_table(items: list[dict[str, Any]], limit: int = 100) -> str:
    """A job's shards, one per line: those not SUCCEEDED first, then the rest, ``limit`` in all."""
    first = sorted(items, key=lambda s: (s["state"] == "SUCCEEDED", s["index"]))[:limit]
    rows = []
    for s in sorted(first, key=lambda s: s["index"]):
        detail = _error_text(s["error"]) if s.get("error") else ", ".join(s.get("outputs") or [])
        if s.get("last_error"):
            detail = f"retried after {_error_text(s['last_error'])}; {detail}"
        rows.append([s["index"], s["state"] or "GONE", s["attempts"], s.get("worker"), detail])
    more = f"\n({len(items) - limit} more shards: gpufleet status --json)" if len(items) > limit else ""
    return table(["shard", "state", "attempts", "worker", "error or outputs"], rows) + more


def _error_text(err: object) -> str:
    if isinstance(err, dict):
        return f"{err.get('errorType', 'Error')}: {err.get('errorMessage', '')}"
    return str(err)
