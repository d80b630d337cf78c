"""Per-task time limits, and the task of a pool process that died, watched from the GPU worker's parent process.

The pool process runs one task after another without going back to Celery in between (see
:meth:`Runtime.execute <gpufleet.worker.runtime.Runtime.execute>`), so Celery's time limits, which count per Celery
message, do not apply. Instead:

- soft: at ``timeout_s`` a ``SIGALRM`` in the pool process raises ``SoftTimeLimitExceeded`` in the handler, as
  Celery's soft limit does;
- hard: the pool process writes its task's hard deadline (``timeout_s + kill_grace_s``) into a page it shares with
  this parent process. A thread here SIGKILLs it past the deadline, whatever the handler does (stuck in C code with
  the GIL held included), and records the task TIMED_OUT (the events of a batch call go back to run alone);
- the same thread sees a pool process that died (out of memory, a crash, a cancel that had to kill it) and ends its
  task's lease, so housekeeping re-queues it within a second rather than after ``lease_s``;
- the page also lists the tasks the process holds without running them: a finished one whose outcome is still on
  its way to Redis (a kill or a death ends its lease: it runs again, as the running one does), and those it has not
  started: the next task, claimed while the current one runs, and the events of a batch waiting for a later call.
  Those go back to the head of their queue with their attempt not counted: another task's crash is not theirs;
- a task the dead process claimed that the page does not list never started either: its claim was still on its way
  back from Redis (the next task, claimed ahead or between two tasks) when the process died. Redis lists it as
  RUNNING under the process's owner token; it goes back uncounted too (it used to wait for its lease, and count);
- when Celery starts a warm shutdown this process raises a flag on the page, and the pool process takes no further
  task from its queues.

The page is a seqlock: the pool process bumps ``seq`` to odd, writes, bumps it to even; a reader keeps only a
consistent read.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import structlog

from gpufleet.worker.lease import owner_of

log = structlog.get_logger("gpufleet.worker")

# Byte 0 is the stop flag, which only the parent writes; the pool process writes the rest: a header, then as JSON the
# tasks it runs ([[id, token], ...]: a batch has several), those it holds once run, those it has not started, and the
# process's owner (the part of its tokens that names it: see gpufleet.worker.lease.owner_of).
_HEAD = struct.Struct("<QdiI")  # seq, deadline, pid, length of the JSON
_AT = 8
_SIZE = 1 << 18  # room for the largest batch's ids and tokens
CHECK_EVERY_S = 0.2


@dataclass(frozen=True)
class Running:
    """What the pool process said it runs."""

    tasks: tuple[tuple[str, str], ...]  # (task id, owner token) each
    pid: int
    deadline: float  # wall clock: past this, the process is killed
    held: tuple[tuple[str, str], ...] = ()  # run, its outcome on its way to Redis
    unstarted: tuple[tuple[str, str], ...] = ()  # claimed, never started: the next task, a batch's later events
    owner: str = ""  # the process that wrote the page, idle or not: owner_of its tokens

    @property
    def all(self) -> tuple[tuple[str, str], ...]:
        return self.tasks + self.held + self.unstarted

    @property
    def not_started(self) -> tuple[tuple[str, str], ...]:
        """The unstarted tasks, less any the process has started since it listed them."""
        return tuple(t for t in self.unstarted if t not in self.tasks)


class SharedSlot:
    """The page one pool process shares with its parent. Create it in the parent before the pool forks."""

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, _SIZE)  # anonymous and shared: a forked child writes what the parent reads
        # Pool process: what the page says, and a lock, as two threads write it (the runtime and the one that claims
        # the next task ahead).
        self._lock = threading.Lock()
        self._running: list[tuple[str, str]] = []
        self._deadline = 0.0
        self._held: list[tuple[str, str]] = []
        self._unstarted: list[tuple[str, str]] = []
        self._waiting: list[tuple[str, str]] = []
        self._ran: list[tuple[str, str]] = []
        self._owner = ""

    def own(self, owner: str) -> None:
        """Pool process, at boot: the page names this process from its next write on, idle or not."""
        self._owner = owner

    def arm(
        self,
        tasks: list[tuple[str, str]],
        deadline: float,
        waiting: list[tuple[str, str]] | None = None,
        ran: list[tuple[str, str]] | None = None,
    ) -> None:
        """Pool process: it runs these (task id, token) now, to be killed past ``deadline``. For a batch: ``waiting``,
        its events held for a later call (given back uncounted if the process dies or is killed), and ``ran``, those
        an earlier call ran, whose outcomes are not written yet (they run again, counted)."""
        with self._lock:
            self._running, self._deadline, self._waiting = list(tasks), deadline, list(waiting or ())
            self._ran = list(ran or ())
            self._write()

    def hold(self, run: list[tuple[str, str]], unstarted: list[tuple[str, str]]) -> None:
        """Pool process: it holds these without running them: ``run``, finished with their outcome on its way (they
        run again if it dies), and ``unstarted``, claimed ahead (they go back with their attempt not counted)."""
        with self._lock:
            self._held, self._unstarted = list(run), list(unstarted)
            self._write()

    def disarm(self) -> None:
        with self._lock:
            self._running, self._deadline, self._held, self._unstarted, self._waiting = [], 0.0, [], [], []
            self._ran = []
            self._write()

    def _write(self) -> None:
        held, unstarted = self._ran + self._held, self._unstarted + self._waiting
        listed = self._running + held + unstarted
        owner = self._owner or (owner_of(listed[0][1]) if listed else "")
        blob = orjson.dumps([self._running, held, unstarted, owner])
        if _AT + _HEAD.size + len(blob) > _SIZE:  # too many to watch: their leases cover them
            blob = orjson.dumps([[], [], [], owner])
        seq = _HEAD.unpack_from(self._page, _AT)[0]
        _HEAD.pack_into(self._page, _AT, seq + 1, self._deadline, os.getpid(), len(blob))
        start = _AT + _HEAD.size
        self._page[start : start + len(blob)] = blob
        _HEAD.pack_into(self._page, _AT, seq + 2, self._deadline, os.getpid(), len(blob))

    def read(self) -> Running | None:
        """Parent: the tasks the pool process runs and holds, and which process it is; None before its first write,
        or while it writes (ask again)."""
        seq, deadline, pid, size = _HEAD.unpack_from(self._page, _AT)
        start = _AT + _HEAD.size
        blob = self._page[start : start + size]
        if not size or seq % 2 or _HEAD.unpack_from(self._page, _AT)[0] != seq:
            return None
        *parts, owner = orjson.loads(blob)
        running, held, unstarted = (tuple((str(i), str(t)) for i, t in part) for part in parts)
        return Running(running, pid, deadline, held, unstarted, str(owner))

    def stop(self) -> None:
        """Parent: a warm shutdown began; the pool process finishes its task and takes no other."""
        self._page[0] = 1

    @property
    def stopping(self) -> bool:
        return self._page[0] == 1


def bury(
    page: Running,
    died: Callable[[str, str], object],
    give_back: Callable[[str, str], object],
    held_by: Callable[[str], list[tuple[str, str]]],
) -> None:
    """The pool process that wrote ``page`` is dead. What it ran, or ran and holds with its outcome on its way, runs
    again, its attempt counted (``died``); what it claimed and never started goes back uncounted (``give_back``):
    those the page lists, and those Redis says it holds (``held_by(owner)``) that the page does not list, whose claim
    was on its way back when it died."""
    for task_id, token in page.tasks + page.held:
        died(task_id, token)
    listed = set(page.all)
    strays = tuple(t for t in held_by(page.owner) if t not in listed) if page.owner else ()
    for task_id, token in page.not_started + strays:
        give_back(task_id, token)


class Watchdog(threading.Thread):
    """Parent process: kills a pool process past its task's hard deadline, and ends the lease of the task of one that
    died. ``timed_out(task_id, token)`` records the outcome of a killed task; ``died(task_id, token)`` ends the lease
    of one that ran (it runs again, its attempt counted); ``give_back(task_id, token)`` puts one it never started back
    at the head of its queue, its attempt not counted."""

    def __init__(
        self,
        slot: SharedSlot,
        is_dead: Callable[[str], bool],
        timed_out: Callable[[str, str], None],
        died: Callable[[str, str], object],
        give_back: Callable[[str, str], object],
        held_by: Callable[[str], list[tuple[str, str]]],
    ) -> None:
        super().__init__(name="gpufleet-watchdog", daemon=True)
        self._slot = slot
        self._is_dead = is_dead
        self._timed_out = timed_out
        self._died = died
        self._give_back = give_back
        self._held_by = held_by
        self._killed: Running | None = None
        self._buried = ""  # the owner of the last page whose process was seen dead and handled

    def run(self) -> None:
        while True:
            time.sleep(CHECK_EVERY_S)
            try:
                self.check()
            except Exception:  # a Redis blip: the next round tries again; the lease is the backstop
                log.warning("watchdog check failed", exc_info=True)

    def check(self) -> None:
        page = self._slot.read()
        if page is None or not page.owner or page.owner == self._buried:
            return
        if self._is_dead(page.owner):
            if page.all:
                log.warning("pool process died; its tasks go back to their queue", task_ids=[t for t, _ in page.all])
            bury(page, self._died, self._give_back, self._held_by)
            self._buried = page.owner
        elif page.tasks and time.time() > page.deadline and page != self._killed:
            if self._slot.read() != page:  # it finished (or moved on) meanwhile
                return
            log.warning(
                "handler ran past its hard time limit; killing its process",
                pid=page.pid,
                task_ids=[t for t, _ in page.tasks],
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(page.pid, signal.SIGKILL)
            # One task timed out. A batch call's events go back instead, to run alone on their next attempt: the
            # one that hangs times out then, and its neighbours succeed (see gpufleet.worker.batch). The rest of the
            # page is buried at the next check, once the process is seen dead.
            alone = len(page.tasks) == 1
            for task_id, token in page.tasks:
                (self._timed_out if alone else self._died)(task_id, token)
            self._killed = page
