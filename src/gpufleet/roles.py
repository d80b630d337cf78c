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

import structlog

log = structlog.get_logger("gpufleet.run")
PARENT_ENV = "GPUFLEET_PARENT_PID"


def stop_event_on_signals() -> threading.Event:
    """SIGINT/SIGTERM set the returned event. Only entry points call this, never constructors."""
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGTERM, handle)
    watch_parent(stop.set)
    return stop


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


ROLE_ORDER = ("dispatcher", "worker", "api", "trigger")  # started in this order; stopped in reverse: intake first


class ProcessTree:
    """All roles for one machine, each its own process, restarted if it exits."""

    def __init__(self, config: Path, roles: tuple[str, ...] = ROLE_ORDER, log_dir: Path | None = None) -> None:
        self.config = config
        self.roles = roles
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, role: str) -> None:
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        out = open(self.log_dir / f"{role}.log", "ab") if self.log_dir else None  # noqa: SIM115 - kept by the child
        # Own process group: Ctrl-C reaches only us, and we stop the roles in order.
        self.procs[role] = subprocess.Popen([sys.executable, "-m", "gpufleet", role, "--config", str(self.config)],
                                            env=env, stdout=out, stderr=out, process_group=0)  # fmt: skip
        if out:
            out.close()
        log.info("role started", role=role, pid=self.procs[role].pid)

    def run(self, stop: threading.Event) -> int:
        """Run until ``stop``; a role that keeps failing at start (bad config) stops the tree with exit code 1."""
        fast_failures: dict[str, int] = dict.fromkeys(self.roles, 0)
        started: dict[str, float] = {}
        for role in self.roles:
            self._spawn(role)
            started[role] = time.monotonic()
        code = 0
        while not stop.wait(0.5):
            for role, proc in list(self.procs.items()):
                if proc.poll() is None:
                    continue
                fast_failures[role] = fast_failures[role] + 1 if time.monotonic() - started[role] < 10 else 0
                if fast_failures[role] >= 3:
                    log.error("role keeps failing at start; stopping", role=role, exit_code=proc.returncode)
                    stop.set()
                    code = 1
                    break
                log.warning("role exited; restarting", role=role, exit_code=proc.returncode)
                self._spawn(role)
                started[role] = time.monotonic()
        self.stop()
        return code

    def stop(self, timeout_s: float = 60.0) -> None:
        for role in reversed(self.roles):
            proc = self.procs.get(role)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.error("role did not stop in time; killing it", role=role, pid=proc.pid)
                proc.kill()
                proc.wait()
            log.info("role stopped", role=role, exit_code=proc.returncode)
