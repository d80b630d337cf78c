"""Spot GPUs: the notice that a host's GPUs are being reclaimed, and what the host does about it.

``worker.preempt_notice`` says how the notice comes: ``sigterm`` (the VM's shutdown signal, as on most clouds' spot
VMs), a ``file://`` path that appears (written by an agent, or a Kubernetes preStop hook), or an ``http(s)://`` URL
that answers 200 once a notice is out (AWS's ``/latest/meta-data/spot/instance-action`` answers 404 until then). The
supervisor watches for it each second. On a notice, each pool process gets SIGUSR2: the running tasks' ``on_preempt``
hooks run (they may ``ctx.checkpoint``), the handlers get ``TaskPreempted``, and the tasks go back to the head of their
queues without spending ``max_attempts`` (see :meth:`gpufleet.worker.attempt.Attempt.preempted`); then the host stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import structlog

log = structlog.get_logger("gpufleet.supervisor")
URL_EVERY_S = 2.0  # how often a notice URL is asked
URL_TIMEOUT_S = 0.5


class Notice:
    """Where a preemption notice comes from (``worker.preempt_notice``), and whether it came."""

    def __init__(self, spec: str | None) -> None:
        self.spec = spec
        self.on_sigterm = spec == "sigterm"
        self._asked_at = -URL_EVERY_S

    def arrived(self) -> bool:
        """Whether a file or URL notice is out (a SIGTERM notice arrives as the signal itself)."""
        if self.spec is None or self.on_sigterm:
            return False
        if self.spec.startswith("file://"):
            return Path(self.spec.removeprefix("file://")).exists()
        now = time.monotonic()
        if now - self._asked_at < URL_EVERY_S:
            return False
        self._asked_at = now
        try:
            with urllib.request.urlopen(self.spec, timeout=URL_TIMEOUT_S) as answer:  # noqa: S310 - the operator's URL
                return int(answer.status) == 200
        except OSError:  # 404 (no notice yet), or the endpoint is not there
            return False


def preempt(procs: list[Any]) -> int:
    """SIGUSR2 to the pool processes of the worker processes ``procs`` (see the module's rule); returns how many."""
    told = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGUSR2)
                    told += 1
    return told
