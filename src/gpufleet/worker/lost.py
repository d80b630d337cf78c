"""Finding tasks whose message was lost between Redis and a worker.

Celery's Redis transport pops a message (``BRPOP``), then records it as unacknowledged. A consumer killed or frozen
in between takes the message with it: the task stays QUEUED with no message anywhere. A consumer that dies after
recording it leaves it in kombu's unacked hash, which is restored only after ``visibility_timeout`` (25 h). Leases
cover neither: they start when a worker claims the task.

Every supervisor scans each queue every second (:meth:`Registry.scan_lost`: the pending tasks ordered before the
head of the list have left it). A task seen there with the same position for ``grace_s`` (``worker.lease_s``) is
pushed again at the head of its queue (:meth:`Registry.requeue_lost`, a compare-and-set on that position). A
message is in flight for milliseconds, so a live worker that was merely slow loses nothing: the claim's own
compare-and-set lets only one delivery run the task, and the other copy is dropped.
"""

from __future__ import annotations

import time

import structlog

from gpufleet.registry.model import EnvelopeFor
from gpufleet.registry.store import Registry

log = structlog.get_logger("gpufleet.lost")


class LostMessages:
    def __init__(self, registry: Registry, grace_s: float, envelope_for: EnvelopeFor) -> None:
        self.registry = registry
        self.envelope_for = envelope_for
        self.grace_s = grace_s
        self._suspects: dict[tuple[str, str], tuple[bytes, float]] = {}  # (queue, id) -> (score, first seen)
        self.requeued = 0

    def tick(self) -> int:
        """Scan every queue once; push again what has been out of its queue for ``grace_s``. Returns how many."""
        now = time.monotonic()
        seen = {
            (queue, task_id): score
            for queue in self.registry.queues()
            for task_id, score in self.registry.scan_lost(queue)
        }
        suspects: dict[tuple[str, str], tuple[bytes, float]] = {}
        requeued = 0
        for key, score in seen.items():
            earlier = self._suspects.get(key)
            since = earlier[1] if earlier is not None and earlier[0] == score else now
            if now - since < self.grace_s:
                suspects[key] = (score, since)
            elif self.registry.requeue_lost(key[1], key[0], score, self.envelope_for):
                log.warning(
                    "a task's message was lost on its way to a worker; pushed again",
                    task_id=key[1],
                    queue=key[0],
                    out_of_queue_s=round(now - since, 1),
                )
                requeued += 1
        self._suspects = suspects
        self.requeued += requeued
        return requeued
