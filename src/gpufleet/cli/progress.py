"""Following a task live: a one-line progress bar, and the loop that polls the task until it finishes.

``[#####.....]  50%  message  (RUNNING 3.2s)``: redrawn in place with ``\\r`` on a terminal, capped to its
width. Anywhere else (a pipe, a CI log) each change of state, progress or message is printed once, as its own
line, so logs stay readable. Stdlib only: no dependency for a progress bar.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any, TextIO

from gpufleet.cli.output import one_line

BAR_WIDTH = 20
POLL_S = 0.25


def elapsed_s(view: dict[str, Any], now: float) -> float | None:
    """Seconds in the current phase: running since it started, queued since it was queued, or how long a
    finished task ran. None when the record lacks the timestamps."""
    state = view.get("state")
    if state == "RUNNING":
        start, end = view.get("started_at"), None
    elif state == "QUEUED":
        start, end = view.get("queued_at") or view.get("created_at"), None
    else:
        start, end = view.get("started_at") or view.get("created_at"), view.get("finished_at")
    t0 = _epoch(start)
    if t0 is None:
        return None
    t1 = _epoch(end) if end else now
    return max(0.0, (t1 if t1 is not None else now) - t0)  # clocks of different hosts may disagree a little


def _epoch(value: object) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def bar_line(view: dict[str, Any], now: float | None = None, columns: int | None = None, width: int = BAR_WIDTH) -> str:
    """The progress line of a task view, at most ``columns - 1`` characters (the message gives way first)."""
    progress = view.get("progress") or {}
    try:
        fraction = min(max(float(progress.get("fraction") or 0.0), 0.0), 1.0)
    except (TypeError, ValueError):
        fraction = 0.0
    filled = int(fraction * width + 1e-9)
    head = f"[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%}"
    took = elapsed_s(view, time.time() if now is None else now)
    status = str(view.get("state", "?")) + ("" if took is None else f" {took:.1f}s")
    attempts, max_attempts = int(view.get("attempts") or 0), int(view.get("max_attempts") or 1)
    if attempts > 1:
        status += f", attempt {attempts}/{max_attempts}"
    tail = f"({status})"
    message = one_line(progress.get("message") or "")
    if columns is None:
        return "  ".join(p for p in (head, message, tail) if p)
    room = columns - 1 - len(head) - len(tail) - 4  # the two separators around the message
    if room < len(message):
        message = message[: room - 1] + "…" if room >= 4 else ""
    return "  ".join(p for p in (head, message, tail) if p)[: max(columns - 1, 1)]


class ProgressDisplay:
    """Draws task views on ``stream`` (stderr): in place on a terminal, else one line per change."""

    def __init__(self, stream: TextIO, tty: bool | None = None, columns: int | None = None) -> None:
        self.stream = stream
        self.tty = _isatty(stream) if tty is None else tty
        self.columns = columns
        self._drawn = 0  # length of the line now on screen (tty)
        self._last: tuple[object, ...] | None = None

    def update(self, view: dict[str, Any], now: float | None = None) -> None:
        if self.tty:
            line = bar_line(view, now, self.columns or _columns(self.stream))
            self.stream.write("\r" + line + " " * max(0, self._drawn - len(line)))
            self._drawn = len(line)
        else:
            progress = view.get("progress") or {}
            key = (view.get("state"), progress.get("fraction"), progress.get("message"), view.get("attempts"))
            if key == self._last:
                return
            self._last = key
            self.stream.write(bar_line(view, now, self.columns) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the line being redrawn, so what follows starts on a fresh one."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = 0


def follow(
    poll: Callable[[], dict[str, Any]],
    terminal: Collection[str],
    display: ProgressDisplay | None = None,
    timeout_s: float | None = None,
    poll_s: float = POLL_S,
) -> tuple[dict[str, Any], bool]:
    """Poll the task until its state is in ``terminal`` or ``timeout_s`` passes, showing every poll on
    ``display`` (a terminal's clock keeps ticking between changes). Returns (last view, timed out)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            view = poll()
            if display is not None:
                display.update(view)
            if view["state"] in terminal:
                return view, False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return view, True
            time.sleep(poll_s if left is None else min(poll_s, left))
    finally:
        if display is not None:
            display.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or fake stream
        return False


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size().columns
