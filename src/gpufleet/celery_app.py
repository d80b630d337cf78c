"""The Celery app factory. No ``shared_task``, no default app, nothing at import time."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpufleet.registry.connection import celery_broker
from gpufleet.registry.messages import PRIORITY_STEPS, SERIALIZER, TASK_NAME, register_serializer

if TYPE_CHECKING:
    from celery import Celery

    from gpufleet.config import Fleet
    from gpufleet.settings import FleetSettings
    from gpufleet.worker.runtime import Runtime


def create_app(fleet: Fleet, runtime: Runtime | None = None) -> Celery:
    """Build the Celery app for a fleet; with a ``runtime`` (in worker processes) the task body runs there.

    Settings that matter for GPU work:
    - ``acks_late`` + ``reject_on_worker_lost``: a task whose process dies goes back to the queue.
    - ``prefetch_multiplier=1`` and ``disable_prefetch`` with concurrency 1: a GPU worker never hoards tasks
      another GPU could run.
    - ``worker_send_task_events`` (``worker.task_events``): Flower and ``celery events`` see tasks and workers.
    - ``visibility_timeout`` longer than the longest task (24 h): Redis would otherwise re-deliver a running task.
      Lost workers are found by the registry's leases instead, in seconds.
    """
    from celery import Celery

    register_serializer()
    broker, sentinel_options = celery_broker(fleet.settings.redis.url)
    app = Celery("gpufleet", broker=broker, set_as_current=False)
    app.conf.update(_conf(fleet.settings, sentinel_options))

    # Remote control (`celery inspect`, Flower) replies in plain JSON. Celery's mailbox takes the task serializer,
    # gpufleet's own, which any client but gpufleet refuses ("Refusing to deserialize untrusted content").
    app.control.mailbox.serializer = "json"

    from celery.worker.request import Request

    class PerTaskLimits(Request):  # type: ignore[misc]
        """No Celery time limit: a delivery may run several gpufleet tasks, each under its own (see
        :mod:`gpufleet.worker.watchdog`). Messages queued by earlier releases carry limits; they are ignored."""

        @property
        def time_limits(self) -> tuple[None, None]:
            return None, None

        @time_limits.setter
        def time_limits(self, value: Any) -> None:
            pass

    @app.task(
        name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True, Request=PerTaskLimits
    )  # type: ignore[untyped-decorator]
    def run(self: Any, function: str, event: Any, meta: dict[str, Any]) -> None:
        if runtime is None:
            raise RuntimeError("gpufleet tasks run only in gpufleet worker processes")
        runtime.execute(self.request.id, function, event, meta)

    return app


def _conf(settings: FleetSettings, sentinel_options: dict[str, Any]) -> dict[str, Any]:
    """The Celery settings (see :func:`create_app`)."""
    visibility = settings.defaults.visibility_timeout_s
    return dict(
        task_serializer=SERIALIZER,
        accept_content=[SERIALIZER, "json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        # Without it the consumer fetches one more message while the pool process runs its task: a message held
        # there that another GPU could run (until the lost-message scan restores it, a second later), and one the
        # pool process, waiting on its queues itself between tasks (Runtime._wait), cannot see.
        worker_disable_prefetch=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=settings.worker.task_events,
        worker_enable_remote_control=settings.worker.task_events,  # `celery inspect`, and Flower's worker pages
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility,
            # kombu scans for overdue messages every interval x throttle (10 x 10 s by default): scale it down
            # with a short window, so the window means what it says.
            "unacked_restore_interval": max(1.0, min(10.0, visibility / 2)),
            "unacked_restore_throttle": 1 if visibility < 300 else 10,
            "socket_connect_timeout": 5,
            # One list per priority level, read highest first; within a level kombu rotates the worker's queues
            # (round robin), so functions that share a GPU take turns.
            "priority_steps": PRIORITY_STEPS,
            "health_check_interval": 30,
            **sentinel_options,
        },
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
