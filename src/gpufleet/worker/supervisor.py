"""``gpufleet worker``: one Celery worker process per GPU, plus housekeeping.

- GPUs come from NVML; with none, ``worker.virtual_gpus`` CPU slots stand in.
- Each slot is a fresh interpreter (``python -m gpufleet.worker.process``), never a fork of this process, with
  ``CUDA_VISIBLE_DEVICES`` pinned to its GPU. It consumes the queue of each function it serves in each of its pools
  whose model is its GPU's or ``any`` (``<prefix>.<pool>.<model>.<function>``), and the pool and model queues that
  releases before per-function queues used.
- A slot that exits is restarted, with backoff if it keeps failing.
- Housekeeping (every second): push retries that are due, age waiting tasks up a priority level (see
  ``defaults.priority_aging_s``), re-queue tasks whose lease lapsed because their worker died, and push again
  tasks whose message was lost on its way to a worker (:mod:`gpufleet.worker.lost`). All are atomic scripts, so
  any number of supervisors may run them. It also expires QUEUED tasks older than their function's
  ``max_event_age_s``, even those in a queue no worker serves. Every minute it also drops index entries of expired
  task records.
- Inventory (every ``INVENTORY_EVERY_S``): each GPU's model, memory, utilisation and process, for ``gpufleet gpus``.
  Then the hand-over: what waits in a pool that has no live worker for its function (one with several pools) moves
  to the pool the overflow policy picks (:meth:`gpufleet.scheduling.placement.Placer.hand_over`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import structlog

from gpufleet.config import Fleet
from gpufleet.control.plane import ControlPlane
from gpufleet.credentials import redact_url
from gpufleet.errors import ConfigError, unreachable_hint
from gpufleet.registry import inventory
from gpufleet.registry.keyspace import Keyspace
from gpufleet.registry.model import REDIS_ERRORS
from gpufleet.registry.store import Registry
from gpufleet.retry import retry_until
from gpufleet.roles import PARENT_ENV
from gpufleet.scheduling.placement import Placer
from gpufleet.worker.gpus import GpuInfo, Sampler, discover, load_nvml
from gpufleet.worker.health import Health
from gpufleet.worker.lease import owner_is_dead
from gpufleet.worker.lost import LostMessages
from gpufleet.worker.preempt import Notice, preempt
from gpufleet.worker.slots import Slot, own_pids, plan_slots, slot_health

log = structlog.get_logger("gpufleet.supervisor")
INVENTORY_EVERY_S = 2.0
# A host's claim on its worker.hostname, refreshed each second, lapses this long after its supervisor stops: a host
# restarted after a crash waits at most this long for its own old claim.
HOST_CLAIM_S = 5.0
TRIM_EVERY_S = 60.0


class Supervisor:
    def __init__(self, fleet: Fleet, gpus: list[GpuInfo] | None = None, nvml: object = None) -> None:
        self.fleet = fleet
        s = fleet.settings
        nvml = nvml or load_nvml(s.worker.fake_nvml)
        self.slots = plan_slots(fleet, discover(nvml) if gpus is None else gpus)
        self.registry = Registry.for_fleet(s)
        self.sampler = Sampler([slot.gpu for slot in self.slots], nvml)
        self.control = ControlPlane(fleet, self.registry)
        self.envelopes = self.control.envelopes
        self.lost = LostMessages(self.registry, s.worker.lease_s, self.envelopes)
        # A pool whose workers are all gone hands its waiting tasks to the next (functions with several pools).
        self.placer = Placer(self.registry, fleet.functions.values(), s.worker.reserve_after_s)
        self.host_key = Keyspace(s.redis.key_prefix).host(s.worker.hostname)
        self.draining = False  # every GPU of this host cordoned
        self.notice = Notice(s.worker.preempt_notice)
        self.instance = uuid.uuid4().hex

    def _spawn(self, slot: Slot) -> None:
        cmd = [
            sys.executable,
            "-m",
            "gpufleet.worker.process",
            "--config",
            str(self.fleet.config_file),
            "--name",
            slot.name,
            "--gpu",
            f"{slot.name}:{slot.gpu.kind}",
            "--queues",
            ",".join(slot.queues),
            "--device",
            ",".join(gpu.uuid for gpu in slot.gpus if not gpu.virtual),  # a group's: its tightest GPU's memory
            "--holds",
            ",".join(str(i) for i in slot.holds),
        ]
        env = {**os.environ, **slot.env, PARENT_ENV: str(os.getpid())}
        # Own process group: a terminal's Ctrl-C reaches only the supervisor, which stops the slots in order.
        slot.proc = subprocess.Popen(cmd, env=env, process_group=0)
        slot.started_at = time.monotonic()
        log.info("gpu worker started", slot=slot.name, pid=slot.proc.pid, queues=slot.queues, gpu=slot.gpu.name)

    def run(self, stop: threading.Event) -> None:
        """
        Raises:
            ConfigError: another live host runs under this ``worker.hostname``.
        """
        if not self.slots:
            log.error("no GPU found and worker.virtual_gpus is 0: nothing to run")
            return
        hint = unreachable_hint("Redis", "redis.url", redact_url(self.fleet.settings.redis.url))
        if not retry_until(lambda: self._claim_host(stop), stop, "claim worker.hostname", 5.0, REDIS_ERRORS, hint):
            return
        if stop.is_set():
            return
        # No process of this host runs yet: what its GPUs' holds say is from before (see gpufleet.worker.holds).
        self.registry.client.delete(self.registry.keys.holds(self.fleet.settings.worker.hostname))
        fenced = inventory.cordons(self.registry)
        for slot in self.slots:
            # A GPU cordoned before this supervisor started takes nothing, not even for a round.
            slot.cordoned = f"{slot.name}@{self.fleet.settings.worker.hostname}" in fenced
            if not slot.cordoned:
                self._spawn(slot)
        next_inventory = next_trim = 0.0
        preempted = False
        while not stop.wait(1.0):
            if self.notice.arrived():
                preempted = True
                log.warning("preemption notice: the tasks go back, and this host stops", notice=self.notice.spec)
                break
            self._restart_exited()
            now = time.monotonic()
            try:
                if not self._hold_host():
                    log.error(
                        "another host took worker.hostname while this one was away (frozen?); stopping",
                        hostname=self.fleet.settings.worker.hostname,
                    )
                    stop.set()
                    break
                promoted, reaped = self.registry.housekeep(self.envelopes)
                aged = self.registry.age(self.fleet.settings.defaults.priority_aging_s)
                if promoted or reaped or aged:
                    log.info("housekeeping", retries_pushed=promoted, lost_tasks_requeued=reaped, aged=aged)
                self.lost.tick()
                self.control.expire_due()
                if now >= next_inventory:
                    healths = self.sampler.health([slot.gpu for slot in self.slots if not slot.gang])
                    self._tend(healths)
                    inventory.publish_gpus(self.registry, self.inventory(healths))
                    next_inventory = now + INVENTORY_EVERY_S
                    # One supervisor per round does it (the first to take the round's lock): each reads the whole
                    # inventory, and a fleet of many hosts need not read it many times over.
                    lock = self.registry.keys.hand_over
                    if self.placer.functions and self.registry.client.set(
                        lock, self.instance, nx=True, px=int(INVENTORY_EVERY_S * 1000)
                    ):
                        self.placer.hand_over(self.envelopes)
                if now >= next_trim:
                    self.registry.trim_index()
                    next_trim = now + TRIM_EVERY_S
            except Exception:  # Redis blips: try again on the next tick
                log.warning("housekeeping failed", exc_info=True)
        if preempted or self.notice.on_sigterm:  # its GPUs are going: hand the tasks back at once
            told = preempt([slot.proc for slot in self.slots if slot.proc is not None and slot.proc.poll() is None])
            log.warning("preempted: the running tasks' on_preempt hooks run, then they go back", pool_processes=told)
        self.stop(self.fleet.settings.worker.shutdown_grace_s)
        self.sampler.close()
        with contextlib.suppress(*REDIS_ERRORS):
            if self.registry.client.get(self.host_key) == self.instance.encode():
                self.registry.client.delete(self.host_key)

    def _claim_host(self, stop: threading.Event) -> None:
        """``worker.hostname`` names one live host: leases, takeovers ("its owner on this host is dead") and the
        inventory key on it, so two hosts under one name would take each other's running tasks. A name held by
        another instance is waited for (a host that just restarted: its old claim lapses within HOST_CLAIM_S),
        then refused."""
        deadline = time.monotonic() + HOST_CLAIM_S + 2
        while not self.registry.client.set(self.host_key, self.instance, nx=True, ex=int(HOST_CLAIM_S)):
            if time.monotonic() > deadline:
                name = self.fleet.settings.worker.hostname
                raise ConfigError(
                    f"another worker host is running as worker.hostname={name!r}",
                    file=str(self.fleet.config_file),
                    key="worker.hostname",
                    fix="give each host its own name: GPUFLEET_WORKER__HOSTNAME",
                )
            if stop.wait(1.0):
                return

    def _hold_host(self) -> bool:
        """Refresh the claim; False if another instance holds the name now."""
        held = self.registry.client.get(self.host_key)
        if held is not None and held != self.instance.encode():
            return False
        self.registry.client.set(self.host_key, self.instance, ex=int(HOST_CLAIM_S))
        return True

    def inventory(self, healths: dict[str, Health] | None = None) -> dict[str, dict[str, object]]:
        """Worker name -> the GPU it owns (live memory, utilisation and health from NVML) and its process."""
        host = self.fleet.settings.worker.hostname
        now = time.time()
        out: dict[str, dict[str, object]] = {}
        for slot in self.slots:
            worker = f"{slot.name}@{host}"
            alive = slot.proc is not None and slot.proc.poll() is None
            health = slot_health(slot, healths or {})
            out[worker] = {
                "worker": worker,
                "host": host,
                **self.sampler.sample(slot.gpu, own_pids(slot.proc)),
                **health.facts,
                "health": {"broken": health.broken, "warnings": list(health.warnings)},
                "host_draining": self.draining,
                "pid": slot.proc.pid if alive and slot.proc else None,
                "up": alive,
                "queues": slot.queues,
                "gang": [gpu.label for gpu in slot.gang] or None,  # a worker of several GPUs: theirs
                "restarts": slot.restarts,
                "restarts_total": slot.restarts_total,
                "pools": list(self.fleet.settings.worker.pools),
                "seen_at": now,
            }
        return out

    def _tend(self, healths: dict[str, Health]) -> None:
        """Cordon a GPU found broken: its worker is killed at once and its tasks go back uncounted. Stop the worker of
        a GPU an operator cordoned (its running task finishes first). Lift a health cordon once the GPU has looked
        healthy for ``worker.auto_uncordon_s``, where set. A cordoned GPU's worker is not started again until it is
        uncordoned; a host whose GPUs are all cordoned drains (the inventory says so, and takes nothing)."""
        host, auto = self.fleet.settings.worker.hostname, self.fleet.settings.worker.auto_uncordon_s
        fenced = inventory.cordons(self.registry)
        now = time.monotonic()
        for slot in self.slots:
            worker = f"{slot.name}@{host}"
            health = slot_health(slot, healths)
            # A worker of several GPUs is cordoned with any of them.
            cordon = next((c for g in slot.gpus if (c := fenced.get(f"{g.label}@{host}"))), None) if slot.gang else None
            cordon = fenced.get(worker) or cordon
            alive = slot.proc is not None and slot.proc.poll() is None
            if health.broken:
                slot.healthy_since = None
                if cordon is None:
                    inventory.cordon(self.registry, worker, health.broken, "health")
                    log.error("GPU broken: cordoned", worker=worker, reason=health.broken)
                if alive:
                    self._kill_slot(slot, f"its GPU was cordoned: {health.broken}")
            else:
                slot.healthy_since = slot.healthy_since or now
                if cordon and cordon.get("by") == "health" and auto is not None and now - slot.healthy_since >= auto:
                    inventory.uncordon(self.registry, worker)
                    log.warning("GPU healthy again: uncordoned", worker=worker, was=cordon.get("reason"))
                    cordon = None
                elif cordon and alive and not slot.cordoned:  # an operator's: its running task finishes first
                    assert slot.proc is not None
                    slot.proc.send_signal(signal.SIGTERM)
                    log.warning("GPU cordoned; its worker stops once its task is done", worker=worker)
            slot.cordoned = cordon is not None or bool(health.broken)
        draining = bool(self.slots) and all(slot.cordoned for slot in self.slots)
        if draining and not self.draining:
            log.warning("every GPU of this host is cordoned: it takes no task until one is uncordoned")
        self.draining = draining

    def _kill_slot(self, slot: Slot, why: str) -> None:
        """Kill a slot's worker now (its process group: the pool process too) and hand its tasks back uncounted."""
        assert slot.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(slot.proc.pid, signal.SIGKILL)
        slot.proc.wait()
        slot.proc = None
        self._hand_back([f"{slot.name}@{self.fleet.settings.worker.hostname}"], why, "GpuCordoned")

    def _restart_exited(self) -> None:
        backoff = self.fleet.settings.worker.restart_backoff_s
        now = time.monotonic()
        for slot in self.slots:
            if slot.cordoned:  # stopped on purpose: started again once uncordoned
                if slot.proc is not None and slot.proc.poll() is not None:
                    slot.proc = None
                continue
            if slot.proc is None or slot.proc.poll() is None:
                if slot.proc is None and now >= slot.next_start:
                    self._spawn(slot)
                continue
            code = slot.proc.returncode
            # A slot that ran a while before exiting gets a fresh backoff; a crash loop backs off up to a minute.
            slot.restarts = 0 if now - slot.started_at > 60 else slot.restarts + 1
            slot.restarts_total += 1
            slot.next_start = now + min(60.0, backoff * (2 ** max(slot.restarts - 1, 0))) if slot.restarts else now
            log.warning("gpu worker exited; restarting", slot=slot.name, exit_code=code, restarts=slot.restarts)
            slot.proc = None

    def stop(self, grace_s: float = 30.0) -> None:
        """Drain: SIGTERM makes each GPU worker stop taking tasks at once (Celery's warm shutdown) and finish the
        one it runs. A worker still running after ``grace_s`` is killed with its pool process (its process group),
        and its task handed back to the head of its queue, the attempt not counted: another worker takes it."""
        slots = [s for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for slot in slots:
            assert slot.proc is not None
            slot.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for slot in slots:
            assert slot.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                slot.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        overdue = [s for s in slots if s.proc is not None and s.proc.poll() is None]
        for slot in overdue:
            assert slot.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(slot.proc.pid, signal.SIGKILL)  # its own group: the Celery worker and its pool process
            slot.proc.wait()
        if overdue:
            why = f"the worker stopped; the task ran past worker.shutdown_grace_s ({grace_s:g} s) and was handed back"
            self._hand_back([f"{s.name}@{self.fleet.settings.worker.hostname}" for s in overdue], why)
        for slot in self.slots:
            slot.proc = None
        log.info("gpu workers stopped", handed_back_from=len(overdue))

    def _hand_back(self, workers: list[str], message: str, error_type: str = "WorkerStopped") -> None:
        """The RUNNING tasks of ``workers``, whose processes were killed, back to the head of their queues uncounted."""
        host = self.fleet.settings.worker.hostname
        try:
            held = inventory.running(self.registry)
            for worker in workers:
                for task_id in held.get(worker, []):  # the one it ran, and the next it had claimed ahead
                    record = self.registry.get(task_id)
                    if record is None or record.get("state") != "RUNNING":
                        continue
                    token = str(record.get("token", ""))
                    if _dies(token, host) and self.registry.hand_back(
                        task_id, token, self.envelopes, message, error_type
                    ):
                        log.warning("task handed back; its attempt does not count", task_id=task_id, worker=worker)
        except REDIS_ERRORS as exc:  # its lease lapses instead, and another supervisor re-queues it
            log.error("cannot hand tasks back; their leases will lapse and they will run again", error=str(exc))


def _dies(token: str, host: str, within_s: float = 5.0) -> bool:
    """Whether the process that owns a task is gone within ``within_s``: a killed process takes a moment to go."""
    deadline = time.monotonic() + within_s
    while not owner_is_dead(token, host):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
