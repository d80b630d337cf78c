"""One GPU worker process: a Celery worker, prefork pool of concurrency 1, pinned to one GPU.

The supervisor starts it with ``CUDA_VISIBLE_DEVICES`` already set, as a fresh interpreter (not a fork). This
process is the pool's parent: it never touches CUDA. The handler, its ``setup()`` and any model live in the pool
child, created after the fork; if the child dies, Celery starts a new one and the task goes back to the queue.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import orjson
import structlog

from gpufleet.celery_app import create_app
from gpufleet.config import Fleet, load_fleet
from gpufleet.logs import PrintsToLog, configure_logging
from gpufleet.registry import inventory
from gpufleet.roles import watch_parent
from gpufleet.worker.lease import owner_is_dead
from gpufleet.worker.outcome import timed_out_by_watchdog
from gpufleet.worker.runtime import Runtime
from gpufleet.worker.watchdog import SharedSlot, Watchdog

log = structlog.get_logger("gpufleet.worker")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gpufleet-gpu-worker")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--name", required=True, help="e.g. gpu0; the Celery node is NAME@HOST")
    parser.add_argument("--gpu", required=True, help="label recorded with each task, e.g. gpu0:H100")
    parser.add_argument("--queues", required=True, help="comma-separated queue names")
    parser.add_argument("--device", default="", help="the GPU's NVML UUID (comma-separated, a group's); '' if virtual")
    parser.add_argument("--holds", default="", help="comma-separated indices of the GPUs it holds to run a task")
    args = parser.parse_args(argv)

    fleet = load_fleet(args.config)
    configure_logging(fleet.settings.logging, worker=args.name, gpu=args.gpu)
    _quiet_celery(fleet.settings.logging.format == "json")
    queues = args.queues.split(",")
    slot = SharedSlot()  # before the pool forks: the pool process inherits it
    holds = tuple(int(i) for i in args.holds.split(",") if i)
    worker = f"{args.name}@{fleet.settings.worker.hostname}"
    runtime = Runtime(fleet, worker, args.gpu, queues, slot, args.device, holds)
    runtime.bundle.check_scratch()  # here, in the parent: a pool child that raised at boot would be restarted in a loop
    app = create_app(fleet, runtime)
    app.steps["consumer"].add(_prompt_step())
    _hook_pool(fleet, runtime, slot, args.name, args.gpu)
    _start_watchdog(fleet, runtime, slot)
    # If the supervisor dies, shut down warm instead of running on unsupervised.
    watch_parent(lambda: os.kill(os.getpid(), signal.SIGTERM))
    worker = app.Worker(
        hostname=f"{args.name}@{fleet.settings.worker.hostname}",
        queues=queues,
        concurrency=1,
        pool="prefork",
        prefetch_multiplier=1,
        optimization="fair",
        without_mingle=True,
        without_gossip=True,  # gossip consumes every other worker's events: no use to a GPU worker
        without_heartbeat=not fleet.settings.worker.task_events,  # heartbeats are how Flower sees a worker online
        loglevel=fleet.settings.logging.level.upper(),
        quiet=True,
    )
    worker.start()
    raise SystemExit(worker.exitcode)


def _hook_pool(fleet: Fleet, runtime: Runtime, slot: SharedSlot, name: str, gpu: str) -> None:
    """Celery's signals: the pool process boots the runtime after the fork, exits at once at a warm shutdown, and
    a warm shutdown stops it taking tasks."""
    from celery import signals

    def on_child_init(**_: Any) -> None:
        configure_logging(fleet.settings.logging, worker=name, gpu=gpu)
        sys.stdout = PrintsToLog()  # a handler's print() is a log line too
        runtime.boot()

    signals.worker_process_init.connect(on_child_init, weak=False)

    def on_child_exit(**_: Any) -> None:
        # billiard's pool process sleeps a second before it exits, so that its parent reads its last message
        # first; at a warm shutdown the parent is only waiting for it to go (an idle fleet took 2-3 s to stop). Its
        # last task's outcome is in Redis by now (execute writes it before it returns); its log lines are flushed.
        if slot.stopping:
            runtime.bundle.write_tally()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(0)

    signals.worker_process_shutdown.connect(on_child_exit, weak=False)
    # A warm shutdown: the pool process finishes its task and takes no other from the queues.
    signals.worker_shutting_down.connect(lambda **_: slot.stop(), weak=False)


def _start_watchdog(fleet: Fleet, runtime: Runtime, slot: SharedSlot) -> None:
    """The thread that watches the pool process's page (see :mod:`gpufleet.worker.watchdog`)."""
    host = fleet.settings.worker.hostname
    parent = runtime.bundle  # this process's: the pool process makes its own after the fork (Runtime.boot)
    Watchdog(
        slot,
        lambda token: owner_is_dead(token, host),
        functools.partial(timed_out_by_watchdog, parent),
        lambda task_id, token: parent.registry.lapse(task_id, token),
        lambda task_id, token: runtime.give_back(task_id, token),
        lambda owner: inventory.held_by(parent.registry, owner),
    ).start()


def _prompt_step() -> type:
    from celery import bootsteps

    class Prompt(bootsteps.StartStopStep):  # type: ignore[misc]
        """Wakes Celery's event loop every 0.1 s. The loop looks at its stop flag only between polls, which wait up
        to a second: a SIGTERM to an idle worker waited that out (Ctrl-C of an idle fleet took 2-3 s)."""

        def start(self, c: Any) -> None:
            c.timer.call_repeatedly(0.1, _noop)

    return Prompt


def _noop() -> None:
    pass


def _quiet_celery(json_lines: bool) -> None:
    """Celery's own notices, as log lines: its root warning (many lines) becomes one of ours, and its shutdown
    notices ("worker: Warm shutdown"), which it writes as plain text, become JSON lines like the rest."""
    import celery.apps.worker
    from celery.exceptions import SecurityWarning

    warnings.filterwarnings("ignore", category=SecurityWarning)
    if os.geteuid() == 0:
        structlog.get_logger("gpufleet.worker").warning(
            "running as root: prefer an unprivileged user (the gpufleet image runs as one)"
        )

    def say(message: str, file: Any = None) -> None:
        # Called from a signal handler: os.write, as Celery's own safe_say, never a buffered (re-entrant) write.
        text = message.strip()
        line = (
            orjson.dumps({"event": text, "level": "info", "logger": "celery.worker"}) if json_lines else text.encode()
        )
        os.write(2, line + b"\n")

    celery.apps.worker.safe_say = say


if __name__ == "__main__":
    main()
