"""What a worker host runs: one worker process per GPU for the one-GPU functions, and one per aligned group of N GPUs
for the functions of N (see :mod:`gpufleet.worker.holds`), each with the queues it reads and the GPUs it sees."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field

import psutil
import structlog

from gpufleet.config import Fleet
from gpufleet.functions import Function
from gpufleet.registry.messages import queue_name
from gpufleet.worker.gpus import GpuInfo, virtual_gpus
from gpufleet.worker.health import Health

log = structlog.get_logger("gpufleet.supervisor")


@dataclass
class Slot:
    gpu: GpuInfo
    queues: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0  # in a row, for the backoff
    restarts_total: int = 0  # since this supervisor started, for gpufleet_worker_restarts_total
    next_start: float = 0.0
    started_at: float = field(default=0.0)
    cordoned: bool = False  # its GPU takes no task: its worker is stopped (see Supervisor._tend)
    healthy_since: float | None = None  # monotonic: since when its GPU has looked healthy
    gang: tuple[GpuInfo, ...] = ()  # the GPUs of a worker for tasks of several GPUs (gpu is the first)
    holds: tuple[int, ...] = ()  # the indices of the GPUs it holds to run a task, where others share them

    @property
    def name(self) -> str:
        """``gpu3``, or ``gpu0-1`` for a worker of GPUs 0 and 1."""
        return self.gpu.label if not self.gang else f"{self.gang[0].label}-{self.gang[-1].index}"

    @property
    def gpus(self) -> tuple[GpuInfo, ...]:
        return self.gang or (self.gpu,)


def plan_slots(fleet: Fleet, gpus: list[GpuInfo]) -> list[Slot]:
    """One slot per GPU (the virtual ones when NVML found none) or MIG instance for the one-GPU functions, and one per
    aligned group of N whole GPUs for the functions of N (see :mod:`gpufleet.worker.holds`). A GPU smaller than a
    function's ``memory_gb`` does not read its queues (a virtual GPU's memory is unknown: it reads them)."""
    s = fleet.settings
    if not gpus:
        gpus = virtual_gpus(s.worker.virtual_gpus, s.worker.gpu_model)
    prefix = s.redis.key_prefix
    gangs = [(group, fns) for n in sorted({fn.gpu.count for fn in fleet.functions.values()} - {1})
             for group, fns in _groups(fleet, gpus, n)]  # fmt: skip
    shared = {gpu.index for group, _ in gangs for gpu in group}
    slots = []
    for gpu in gpus:
        queues = _queues(fleet, [fn for fn in _serving(fleet, [gpu]) if fn.gpu.count == 1])
        for pool in s.worker.pools if not gpu.mig else ():  # older releases' queues, of any function's tasks
            queues += [queue_name(prefix, pool, gpu.model), queue_name(prefix, pool, "any")]
        holds: tuple[int, ...] = (gpu.index,) if gpu.index in shared else ()
        slots.append(Slot(gpu=gpu, queues=list(dict.fromkeys(queues)), env=_env([gpu]), holds=holds))
    for group, fns in gangs:
        holds = tuple(gpu.index for gpu in group)
        slots.append(Slot(gpu=group[0], queues=_queues(fleet, fns), env=_env(group), gang=group, holds=holds))
    return slots


def _serving(fleet: Fleet, gpus: list[GpuInfo]) -> list[Function]:
    """The functions that every GPU of ``gpus`` may run: of their model (or ``any``), and big enough. A MIG instance
    runs the functions of its profile, and those that name their memory and fit in it; a whole GPU, none that asks
    for a profile."""
    pools = fleet.settings.worker.pools
    return [
        fn for fn in fleet.functions.values()
        if any(p in fn.gpu.pools for p in pools)
        and all(fn.gpu.model.lower() in ("any", g.model.lower()) and _takes(g, fn) and fits(fn, g) for g in gpus)
    ]  # fmt: skip


def _takes(gpu: GpuInfo, fn: Function) -> bool:
    """Whether ``gpu`` is of the kind ``fn`` runs on: a whole GPU, a MIG instance of its profile, or one its memory
    fits (which :func:`fits` checks)."""
    if not gpu.mig:
        return not fn.gpu.mig
    return fn.gpu.mig == gpu.mig or (not fn.gpu.mig and fn.gpu.memory_mb is not None)


def _groups(fleet: Fleet, gpus: list[GpuInfo], n: int) -> list[tuple[tuple[GpuInfo, ...], list[Function]]]:
    """The host's aligned groups of ``n`` whole GPUs (0-1, 2-3... for 2), each with the functions of ``n`` it
    serves."""
    whole, out = {g.index: g for g in gpus if not g.mig}, []
    for start in range(0, max(whole, default=-1) + 1, n):
        group = tuple(whole[i] for i in range(start, start + n) if i in whole)
        fns = [fn for fn in _serving(fleet, list(group)) if fn.gpu.count == n] if len(group) == n else []
        if fns:
            out.append((group, fns))
    return out


def _queues(fleet: Fleet, fns: list[Function]) -> list[str]:
    """The queues of ``fns`` in this host's pools: the function's, which any version serves, and its own version's
    (the same for $LATEST)."""
    prefix, queues = fleet.settings.redis.key_prefix, []
    for pool in fleet.settings.worker.pools:
        for fn in fns:
            if pool in fn.gpu.pools:
                queues += [
                    queue_name(prefix, pool, fn.gpu.model, fn.name),
                    queue_name(prefix, pool, fn.gpu.model, fn.name, fn.version),
                ]
    return list(dict.fromkeys(queues))


def _env(gpus: list[GpuInfo] | tuple[GpuInfo, ...]) -> dict[str, str]:
    """A worker process sees its GPUs alone (none for virtual ones: their handlers run on the CPU), in PCI order as
    NVML counts them, or its MIG instance by its UUID; ``GPUFLEET_GPUS`` names them, virtual ones too."""
    visible = ",".join(g.uuid if g.mig else str(g.index) for g in gpus if not g.virtual)
    return {"CUDA_VISIBLE_DEVICES": visible, "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "GPUFLEET_GPUS": ",".join(g.label for g in gpus)}  # fmt: skip


def fits(fn: Function, gpu: GpuInfo) -> bool:
    """Whether ``gpu`` is big enough for ``fn`` at all (its memory when empty)."""
    need = fn.gpu.memory_mb
    if need is None or gpu.virtual or gpu.memory_mb >= need:
        return True
    log.info("GPU too small for a function: not reading its queues", gpu=gpu.label, memory_mb=gpu.memory_mb,
             function=fn.name, needs_mb=need)  # fmt: skip
    return False


def own_pids(proc: subprocess.Popen[bytes] | None) -> set[int]:
    """A slot's worker process and its pool process: the memory they hold on its GPU is the worker's own."""
    if proc is None or proc.poll() is not None:
        return set()
    try:
        return {proc.pid, *(child.pid for child in psutil.Process(proc.pid).children(recursive=True))}
    except psutil.Error:  # gone meanwhile
        return {proc.pid}


def slot_health(slot: Slot, healths: dict[str, Health]) -> Health:
    """A slot's GPU's health; a worker of several GPUs is as broken as the first of them that is."""
    found = [healths.get(gpu.label, Health()) for gpu in slot.gpus]
    return next((h for h in found if h.broken), found[0])
