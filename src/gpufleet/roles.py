"""Running roles as processes: signal handling, a parent watchdog, and ``gpufleet run``'s process tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from gpufleet.registry import inventory

if TYPE_CHECKING:
    from gpufleet.config import Fleet

log = structlog.get_logger("gpufleet.run")
PARENT_ENV = "GPUFLEET_PARENT_PID"


def stop_event_on_signals() -> threading.Event:
    """SIGINT/SIGTERM set the returned event. Only entry points call this, never constructors.

    The Python-level handlers do nothing. Python runs a handler in the main thread between two bytecodes, and that
    may be inside a lock the handler needs: one that logged "stopping" ran inside structlog's write lock (not
    reentrant) when the signal came as a line was written, and the process then hung for good on its own SIGTERM.
    The interpreter's C handler also writes each signal's number to the wakeup fd; a thread of ours reads it there,
    logs and sets the event, outside any lock the main thread holds.
    """
    stop = threading.Event()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def relay() -> None:
        while True:
            for signum in os.read(read_fd, 64):  # other signals with a handler arrive here too
                if signum in (signal.SIGINT, signal.SIGTERM):
                    log.info("stopping", signal=signal.Signals(signum).name)
                    stop.set()

    threading.Thread(target=relay, name="gpufleet-signals", daemon=True).start()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _wakes_the_relay)
    watch_parent(stop.set)
    return stop


def _wakes_the_relay(_signum: int, _frame: object) -> None:
    """The wakeup fd carries the signal: see :func:`stop_event_on_signals`."""


def watch_parent(on_exit: Callable[[], None]) -> None:
    """If ``gpufleet run`` started us and then died (even by SIGKILL), stop instead of running orphaned."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return

    def loop() -> None:
        while os.getppid() == int(parent):
            time.sleep(1)
        log.warning("parent process is gone; stopping")
        on_exit()

    threading.Thread(target=loop, name="gpufleet-parent-watch", daemon=True).start()


MAX_BACKOFF_S = 30.0
ROLE_ORDER = ("dispatcher", "worker", "api", "trigger")  # started in this order; stopped in reverse: intake first


def announce_when_ready(fleet: Fleet, roles: tuple[str, ...], stop: threading.Event, timeout_s: float = 120) -> None:
    """One ``ready`` line once this machine's GPU workers are registered and the API answers: the API's URL, the
    GPUs and the triggers. Nothing when the fleet does not get there within ``timeout_s`` (the roles say why)."""
    import httpx

    from gpufleet.registry.model import REDIS_ERRORS
    from gpufleet.registry.store import Registry

    s = fleet.settings
    registry = Registry.from_url(s.redis.url, s.redis.key_prefix)
    host = f"[{s.api.host}]" if ":" in s.api.host else s.api.host  # an IPv6 address, bracketed in a URL
    api = f"http://{host}:{s.api.port}" if "api" in roles else None
    deadline = time.monotonic() + timeout_s
    while not stop.wait(0.5) and time.monotonic() < deadline:
        try:
            gpus = [
                g
                for g in inventory.gpus(registry)
                if g.get("host") == s.worker.hostname and g.get("up") and not g["stale"]
            ]
            if "worker" in roles and not gpus:
                continue
            if api is not None and httpx.get(f"{api}/healthz", timeout=2).status_code != 200:
                continue
        except (*REDIS_ERRORS, httpx.HTTPError):
            continue
        log.info(
            "ready",
            api=api,
            gpus=[f"{g['worker']} ({g.get('name')})" for g in gpus],
            triggers=sorted(t.name for t in fleet.triggers.values() if t.enabled),
        )
        return


class ProcessTree:
    """All roles for one machine, each its own process, restarted if it exits."""

    def __init__(
        self,
        config: Path,
        roles: tuple[str, ...] = ROLE_ORDER,
        log_dir: Path | None = None,
        shutdown_grace_s: float = 30.0,
    ) -> None:
        self.config = config
        self.roles = roles
        self.log_dir = log_dir
        # A role gets this long to stop: the worker's grace for running tasks, and time to hand back the rest.
        self.stop_timeout_s = max(60.0, shutdown_grace_s + 30.0)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, role: str) -> None:
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        out = open(self.log_dir / f"{role}.log", "ab") if self.log_dir else None  # noqa: SIM115 - kept by the child
        # Own process group: Ctrl-C reaches only us, and we stop the roles in order.
        self.procs[role] = subprocess.Popen(
            [sys.executable, "-m", "gpufleet", role, "--config", str(self.config)],
            env=env,
            stdout=out,
            stderr=out,
            process_group=0,
        )
        if out:
            out.close()
        log.info("role started", role=role, pid=self.procs[role].pid)

    def run(self, stop: threading.Event) -> int:
        """Run until ``stop``. A role that exits is restarted; one that keeps failing is restarted with exponential
        backoff (up to :data:`MAX_BACKOFF_S`) and reported, while the other roles go on serving."""
        failures: dict[str, int] = dict.fromkeys(self.roles, 0)
        started: dict[str, float] = {}
        due: dict[str, float] = {}
        for role in self.roles:
            self._spawn(role)
            started[role] = time.monotonic()
        while not stop.wait(0.5):
            now = time.monotonic()
            for role, proc in list(self.procs.items()):
                if proc.poll() is None:
                    continue
                if role not in due:  # it just exited: decide when to start it again
                    # A role that ran a minute is healthy again; one that keeps dying waits longer each time.
                    failures[role] = 0 if now - started[role] > 60 else failures[role] + 1
                    delay = min(MAX_BACKOFF_S, 0.5 * 2 ** min(failures[role], 8)) if failures[role] else 0.0
                    report = log.error if failures[role] >= 3 else log.warning
                    report(
                        "role exited; restarting",
                        role=role,
                        exit_code=proc.returncode,
                        failures_in_a_row=failures[role],
                        restart_in_s=delay,
                    )
                    due[role] = now + delay
                if now >= due[role]:
                    del due[role]
                    self._spawn(role)
                    started[role] = now
        self.stop(self.stop_timeout_s)
        return 0

    def stop(self, timeout_s: float = 60.0) -> None:
        """Intake and the workers together (a trigger stops taking messages, a worker its tasks, and finishes the
        one it runs within its grace), then the dispatcher, so that the records of tasks finishing meanwhile go out.
        One after another, an idle fleet took a second more to stop."""
        self._stop([r for r in reversed(self.roles) if r != "dispatcher"], timeout_s)
        self._stop([r for r in self.roles if r == "dispatcher"], timeout_s)

    def _stop(self, roles: list[str], timeout_s: float) -> None:
        running = {r: p for r in roles if (p := self.procs.get(r)) is not None and p.poll() is None}
        for proc in running.values():
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for role, proc in running.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("role did not stop in time; killing it", role=role, pid=proc.pid)
                proc.kill()
                proc.wait()
            log.info("role stopped", role=role, exit_code=proc.returncode)
