"""Who owns a running task, and the thread that keeps its lease alive and watches for a cancel."""

from __future__ import annotations

import functools
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import structlog

from gpufleet.registry.store import Registry

log = structlog.get_logger("gpufleet.worker")


# A token's start time below this is milliseconds since boot (from the process's clock ticks, which a step of the
# wall clock does not move); above it, a wall-clock time in ms that an older release wrote (psutil's create_time,
# which moves with the boot time the kernel derives from the wall clock: a clock step made a live owner look dead).
BOOT_RELATIVE_BELOW = 10**11
WALL_CLOCK_SLACK_MS = 2000  # an older token's start, compared across such a step


@functools.cache
def _start_ms(pid: int) -> int:
    return _started(pid)


def _started(pid: int) -> int:
    """When process ``pid`` started, in ms since boot: its start in clock ticks (/proc/<pid>/stat, field 22), or
    psutil's create_time where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return int(psutil.Process(pid).create_time() * 1000)
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # after the command name, which may hold spaces
    return ticks * 1000 // os.sysconf("SC_CLK_TCK")


def owner_token(host: str, pid: int) -> str:
    """``host/pid/start-time/nonce``: identifies the process that runs a task, robust to pid reuse, and the claim
    (each claim has its own nonce)."""
    return f"{process_owner(host, pid)}{uuid.uuid4().hex[:8]}"


def process_owner(host: str, pid: int) -> str:
    """``host/pid/start-time/``: what every token of one process starts with."""
    return f"{host}/{pid}/{_start_ms(pid)}/"


def owner_of(token: str) -> str:
    """The process part of a token: what :func:`process_owner` gave it."""
    return token[: token.rfind("/") + 1]


def owner_is_dead(token: str, host: str) -> bool:
    """True when the owner ran on this host and its process is gone (it was killed mid-task)."""
    try:
        owner_host, pid, started, _ = token.split("/")
    except ValueError:
        return False
    if owner_host != host:
        return False  # another host: only its lease lapsing tells us it died
    try:
        proc = psutil.Process(int(pid))
        if int(started) < BOOT_RELATIVE_BELOW:
            other = _started(int(pid)) != int(started)
        else:
            other = abs(int(proc.create_time() * 1000) - int(started)) > WALL_CLOCK_SLACK_MS
        # A zombie is dead too: killed, and not yet reaped by its (possibly also killed) parent.
        return other or proc.status() == psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
        return True


class LeaseKeeper(threading.Thread):
    """Renews the leases of the tasks this process runs (one, or a batch), and watches for cancel requests.

    It polls every ``min(lease_s / 3, 0.5)`` s: one pipeline per GPU, and a cancel is seen within half a second. A
    task whose handler has not returned ``cancel_grace_s`` after its cancel is handed to ``on_overdue``. ``tick`` is
    called at each poll, tasks held or not (the process's histograms are written from there).
    """

    def __init__(
        self,
        registry: Registry,
        lease_s: float,
        cancel_grace_s: float,
        on_overdue: Callable[[str, str], None],
        tick: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(name="gpufleet-lease", daemon=True)
        self._registry = registry
        self._lease_s = lease_s
        self._grace_s = cancel_grace_s
        self._on_overdue = on_overdue
        self._tick = tick
        self._lock = threading.Lock()
        self._held: list[tuple[str, str]] = []
        self._cancel_seen: dict[str, float] = {}
        self._lost: set[str] = set()  # lost (0) or cancel asked (2): what ctx.cancelled reads
        self._requested: set[str] = set()

    def hold(self, tasks: list[tuple[str, str]]) -> None:
        """Keep these (task id, token) alive until :meth:`release`."""
        with self._lock:
            self._held = list(tasks)
            self._cancel_seen.clear()
            self._lost.clear()
            self._requested.clear()

    def release(self) -> None:
        with self._lock:
            self._held = []

    def cancelled(self, task_id: str) -> bool:
        """Asked to stop, or no longer this process's: its handler should return early."""
        return task_id in self._lost

    def cancel_requested(self, task_id: str) -> bool:
        return task_id in self._requested

    def run(self) -> None:
        interval = min(self._lease_s / 3, 0.5)
        while True:
            time.sleep(interval)
            self._tick()
            with self._lock:
                held = list(self._held)
            if not held:
                continue
            try:
                statuses = self._registry.renew_many(held, self._lease_s)
            except Exception:  # a Redis blip must not kill the renewer; the next round retries
                log.warning("lease renewal failed", task_ids=[t for t, _ in held], exc_info=True)
                continue
            now = time.monotonic()
            for (task_id, token), status in zip(held, statuses, strict=True):
                if status != 1:
                    self._lost.add(task_id)
                if status != 2:
                    continue
                self._requested.add(task_id)
                seen = self._cancel_seen.setdefault(task_id, now)
                if seen == now:
                    log.info("cancel requested", task_id=task_id, grace_s=self._grace_s)
                elif now - seen >= self._grace_s:
                    self._on_overdue(task_id, token)
