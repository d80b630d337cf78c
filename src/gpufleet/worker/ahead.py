"""The next task, claimed while the current one runs, and outcomes written off the handler's path.

Between two tasks a pool process used to wait for one Redis round trip: write the outcome and claim the next task
(``POP_CLAIM``). Right after a 20 ms task that round trip costs ~0.5 ms on a VM whose vCPU went idle, 2-3 % of the
GPU's time. Here a helper thread makes that round trip while the handler runs: the outcome of task k and the claim of
task k+2 travel together while task k+1 runs.

What keeps it safe:

- a task claimed ahead is held, not run. The watchdog page lists it, so it is handed back at once if the process dies
  or is killed. If the running task goes on for ``HOLD_S``, it goes back to the head of its queue (``HAND_BACK``,
  its attempt not counted), where another GPU takes it: nothing waits behind a long task;
- behind a function whose last run here took longer than that, the claim waits until ``LEAD_S`` before the running
  task should end, going by that last run (``claim_in``): so the task claimed ahead waits for it about ``LEAD_S``,
  and a task that ends sooner cancels the claim (the runtime then claims as it ends). Before, such tasks were never
  claimed ahead, and each paid a round trip between two handlers (1.5 ms behind a 100 ms task here);
- an outcome on its way is listed on the page too. If the process dies before it reaches Redis, the task's lease ends
  and it runs again: its outcome was never recorded, so no task is recorded twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from gpufleet.worker.item import Item

log = structlog.get_logger("gpufleet.worker")
HOLD_S = 0.05  # how long a task claimed ahead may wait for the running one before it goes back to its queue
LEAD_S = 0.02  # how long before the running task should end a late claim is made (see claim_in)

Tasks = list[tuple[str, str]]  # (task id, owner token) each
# (outcomes pipeline or None, claim the next task?) -> the task claimed, or None
RoundTrip = Callable[[Any, bool], "Item | None"]


class Ahead:
    """One per pool process, made after fork. Only the runtime's thread calls :meth:`send` and :meth:`take`."""

    def __init__(
        self, round_trip: RoundTrip, give_back: Callable[[Item], None], hold: Callable[[Tasks, Tasks], None]
    ) -> None:
        self._round_trip = round_trip  # what the helper thread does: write the outcomes, claim the next
        self._give_back = give_back  # a task claimed ahead, unstarted, back to the head of its queue
        self._hold = hold  # tell the watchdog page which tasks are held: (finished, unstarted)
        self._cond = threading.Condition()
        self._job: tuple[Any, bool, float] | None = None
        self._busy = False  # a round trip or a give-back is under way: take() waits for it
        self._cancel = False  # take() came: a late claim not made yet is not made
        self._item: Item | None = None  # claimed ahead, not taken yet
        threading.Thread(target=self._serve, name="gpufleet-ahead", daemon=True).start()

    def send(self, outcomes: Any, claim: bool, finished: Tasks, claim_in: float = 0.0) -> None:
        """Write the ``outcomes`` pipeline (those of ``finished``) and, with ``claim``, claim the next task: one round
        trip, on the helper thread. With ``claim_in``, the outcomes go at once and the claim that many seconds later,
        unless :meth:`take` comes first. Call :meth:`take` before sending again."""
        self._hold(finished, [])
        with self._cond:
            self._job, self._busy, self._cancel = (outcomes, claim, claim_in), True, False
            self._cond.notify_all()

    def take(self) -> Item | None:
        """The task claimed ahead, once the round trip is done (it was handed back, or there was none: None)."""
        with self._cond:
            # The running task ended: a late claim not made yet (waiting, or behind the outcomes' write) is not made,
            # and the runtime claims now itself.
            self._cancel = True
            self._cond.notify_all()
            while self._busy:
                self._cond.wait()
            item, self._item = self._item, None
            self._cond.notify_all()  # the helper stops holding it
        # Still listed as unstarted until the next send(): a death before it starts gives it back uncounted; once it
        # runs, the page lists it as running too, and that wins.
        return item

    def _serve(self) -> None:
        while True:
            with self._cond:
                while self._job is None:
                    self._cond.wait()
                (outcomes, claim, claim_in), self._job = self._job, None
            item = None
            try:
                if claim and claim_in > 0:
                    if outcomes is not None:
                        self._round_trip(outcomes, False)
                        outcomes = None
                    claim = self._wait_to_claim(claim_in)
                if outcomes is not None or claim:
                    item = self._round_trip(outcomes, claim)
            except Exception:  # the outcomes' leases end and those tasks run again; the loop goes on
                log.warning("cannot write outcomes or claim the next task; their leases will lapse", exc_info=True)
            finally:
                self._hold([], [] if item is None else [(item.task_id, item.token)])
                with self._cond:
                    self._item, self._busy = item, False
                    self._cond.notify_all()
            if item is not None:
                self._wait_or_give_back(item)

    def _wait_to_claim(self, seconds: float) -> bool:
        """Wait ``seconds`` for a late claim; False if :meth:`take` cancelled it meanwhile."""
        until = time.monotonic() + seconds
        with self._cond:
            while not self._cancel and (left := until - time.monotonic()) > 0:
                self._cond.wait(left)
            return not self._cancel

    def _wait_or_give_back(self, item: Item) -> None:
        until = time.monotonic() + HOLD_S
        with self._cond:
            while self._item is item and (left := until - time.monotonic()) > 0:
                self._cond.wait(left)
            if self._item is not item:
                return  # taken
            self._item, self._busy = None, True
        try:
            self._give_back(item)
        except Exception:  # its lease ends instead, and housekeeping re-queues it
            log.warning(
                "cannot give back a task claimed ahead; its lease will lapse", task_id=item.task_id, exc_info=True
            )
        finally:
            self._hold([], [])
            with self._cond:
                self._busy = False
                self._cond.notify_all()
