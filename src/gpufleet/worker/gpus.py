"""GPU discovery with NVML (pynvml, from nvidia-ml-py).

NVML is not CUDA: querying it does not create a CUDA context, so the supervisor may call it before it starts the
per-GPU processes, and a pool process may call it to see its GPU's memory before any handler touches CUDA. Nothing
here imports torch.

With ``worker.fake_nvml`` set, every process of the fleet reads :mod:`gpufleet.dev.fakenvml` instead (tests, and
rehearsals on a machine without a GPU).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from gpufleet.scheduling.gpumodels import MIG_PROFILE_RE, model_of
from gpufleet.worker.health import Health, HealthWatch

log = structlog.get_logger("gpufleet.gpus")
MB = 1024 * 1024


def load_nvml(fake: Path | None = None) -> Any:
    """The NVML module: pynvml (nvidia-ml-py), or with ``fake`` (``worker.fake_nvml``) the fake one answering from
    that file; None without either."""
    if fake is not None:
        from gpufleet.dev import fakenvml

        fakenvml.use(fake)
        return fakenvml
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's memory as NVML sees it now, in MiB. ``own_mb``: what the worker's own processes hold of it, so
    ``others_mb`` is what other processes (another worker, a notebook, another fleet) hold."""

    total_mb: int
    free_mb: int
    used_mb: int
    own_mb: int = 0

    @property
    def others_mb(self) -> int:
        return max(0, self.used_mb - self.own_mb)

    @property
    def room_mb(self) -> int:
        """What a function served by this worker may use: what is free, and what the worker holds already (its
        functions' warm models: every function is set up when the pool process starts)."""
        return self.free_mb + self.own_mb


def read_memory(nvml: Any, handle: Any, own_pids: Collection[int] = ()) -> GpuMemory:
    """``handle``'s memory now; what the processes ``own_pids`` hold is ``own_mb``. NVML lists a process only when
    it has a CUDA context there, and in a container may name it by a host PID: then its memory counts as others'."""
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    own = 0
    if own_pids:
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid in own_pids and proc.usedGpuMemory:  # None where the driver does not tell (vGPU, WDDM)
                own += int(proc.usedGpuMemory)
    return GpuMemory(int(mem.total // MB), int(mem.free // MB), int(mem.used // MB), own // MB)


@dataclass(frozen=True)
class GpuInfo:
    """A GPU a worker runs on: a whole one, or a MIG instance of one (``index`` is its GPU's)."""

    index: int
    name: str
    model: str
    uuid: str
    memory_mb: int
    virtual: bool = False
    mig: str = ""  # a MIG instance's profile (``1g.10gb``); "" for a whole GPU
    slice: int = -1  # a MIG instance's place on its GPU

    @property
    def label(self) -> str:
        """``gpu3``, or ``gpu0.mig2`` for a MIG instance."""
        return f"{'vgpu' if self.virtual else 'gpu'}{self.index}" + (f".mig{self.slice}" if self.mig else "")

    @property
    def kind(self) -> str:
        """Its model, with a MIG instance's profile: ``H100``, ``H100:1g.10gb``."""
        return f"{self.model}:{self.mig}" if self.mig else self.model


MIG_PROFILE = re.compile(rf"\bMIG ({MIG_PROFILE_RE.pattern})")  # NVML's name of an instance: "<GPU> MIG 1g.10gb"


def mig_instances(nvml: Any, handle: Any, index: int, model: str) -> list[GpuInfo]:
    """The MIG instances of GPU ``index`` when it is in MIG mode, as its operator made them (gpufleet reads MIG's
    layout and never changes it); [] for a GPU that is not. Their places may have gaps: NVML counts the most."""
    try:
        current = nvml.nvmlDeviceGetMigMode(handle)[0]
    except Exception:  # noqa: BLE001 - NVML_ERROR_NOT_SUPPORTED: a GPU without MIG
        return []
    if not current:
        return []
    found = []
    for place in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, place)
        except Exception:  # noqa: BLE001, S112 - NVML_ERROR_NOT_FOUND: no instance there
            continue
        name = _text(nvml.nvmlDeviceGetName(mig))
        memory_mb = int(nvml.nvmlDeviceGetMemoryInfo(mig).total // MB)
        profile = m.group(1) if (m := MIG_PROFILE.search(name)) else f"{round(memory_mb / 1024)}gb"
        uuid = _text(nvml.nvmlDeviceGetUUID(mig))
        found.append(GpuInfo(index, name, model, uuid, memory_mb, mig=profile, slice=place))
    if not found:
        log.warning("GPU in MIG mode without an instance: nothing can run on it", gpu=index)
    return found


def discover(nvml: Any = None) -> list[GpuInfo]:
    """The GPUs NVML sees, or [] when there is no driver or no device. ``nvml`` is for tests: a fake module."""
    nvml = nvml or load_nvml()
    if nvml is None:
        return []
    try:
        nvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound / DriverNotLoaded: no usable GPU here
        log.info("no NVIDIA driver found", reason=str(exc))
        return []
    try:
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = _text(nvml.nvmlDeviceGetName(handle))
            instances = mig_instances(nvml, handle, i, model_of(name))
            if instances:  # CUDA runs on its instances, never on the GPU as a whole
                gpus += instances
                continue
            gpus.append(
                GpuInfo(
                    index=i,
                    name=name,
                    model=model_of(name),
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    memory_mb=int(nvml.nvmlDeviceGetMemoryInfo(handle).total // (1024 * 1024)),
                )
            )
        return gpus
    finally:
        nvml.nvmlShutdown()


def virtual_gpus(count: int, model: str | None = None) -> list[GpuInfo]:
    """CPU slots standing in for GPUs on a machine with none: every code path runs, the handler sees no CUDA. With
    ``model`` (``worker.gpu_model``), they stand for GPUs of that series, and serve the functions that ask for it."""
    return [
        GpuInfo(
            index=i,
            name=f"virtual {model}" if model else "virtual",
            model=model or "virtual",
            uuid=f"virtual-{i}",
            memory_mb=0,
            virtual=True,
        )
        for i in range(count)
    ]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Sampler:
    """Live memory and utilisation per GPU, for the inventory. Keeps NVML initialised (it creates no CUDA context)
    and degrades to the static facts when NVML is missing or a query fails."""

    def __init__(self, gpus: list[GpuInfo], nvml: Any = None) -> None:
        self._gpus = gpus
        self._nvml = nvml
        self._ready = False
        self._health: HealthWatch | None = None

    def _init(self) -> bool:
        if self._ready or not any(not g.virtual for g in self._gpus):
            return self._ready
        try:
            self._nvml = self._nvml or load_nvml()
            if self._nvml is None:
                raise RuntimeError("nvidia-ml-py is not installed")
            self._nvml.nvmlInit()
            self._ready = True
            self._health = HealthWatch(self._nvml, sorted({g.index for g in self._gpus if not g.virtual}))
        except Exception as exc:  # noqa: BLE001 - no driver: report the static facts only
            log.info("NVML unavailable for sampling", reason=str(exc))
            self._gpus = [g for g in self._gpus if g.virtual]
        return self._ready

    def sample(self, gpu: GpuInfo, own_pids: Collection[int] = ()) -> dict[str, Any]:
        """The GPU's facts for the inventory; ``own_pids``: its worker's processes (their memory is not others')."""
        facts: dict[str, Any] = {
            "index": gpu.index,
            "name": gpu.name,
            "model": gpu.model,
            "mig": gpu.mig or None,
            "uuid": gpu.uuid,
            "virtual": gpu.virtual,
            "memory_total_mb": gpu.memory_mb,
            "memory_used_mb": None,
            "memory_free_mb": None,
            "memory_others_mb": None,
            "utilization_pct": None,
        }
        if gpu.virtual or not self._init():
            return facts
        try:
            nvml = self._nvml
            handle = nvml.nvmlDeviceGetHandleByUUID(gpu.uuid) if gpu.mig else nvml.nvmlDeviceGetHandleByIndex(gpu.index)
            mem = read_memory(nvml, handle, own_pids)
            facts["memory_total_mb"] = mem.total_mb
            facts["memory_used_mb"] = mem.used_mb
            facts["memory_free_mb"] = mem.free_mb
            facts["memory_others_mb"] = mem.others_mb
            if not gpu.mig:  # NVML has no utilisation for a MIG instance (NVML_ERROR_NOT_SUPPORTED)
                facts["utilization_pct"] = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception as exc:  # noqa: BLE001 - a GPU fallen off the bus must not stop the supervisor
            log.warning("NVML query failed", gpu=gpu.index, error=str(exc))
        return facts

    def health(self, gpus: list[GpuInfo]) -> dict[str, Health]:
        """Each GPU's health now, by its label (see :mod:`gpufleet.worker.health`); a virtual one is healthy."""
        if not self._init() or self._health is None:
            return {g.label: Health() for g in gpus}
        self._health.poll()
        return {g.label: Health() if g.virtual else self._health.check(g.index) for g in gpus}

    def close(self) -> None:
        if self._ready:
            self._ready = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down anyway: nothing to do but log it
                log.debug("NVML shutdown failed", exc_info=True)


class Device:
    """The GPU a pool process is pinned to, as NVML sees it (by UUID: ``CUDA_VISIBLE_DEVICES`` renumbers devices,
    NVML does not), or the GPUs of a worker for tasks of several (UUIDs comma-separated): then the one with the least
    free memory answers, as a task of N GPUs needs its share on each. Its memory is read at most every
    ``max_age_s``; None for a virtual GPU, or while NVML cannot tell (then nothing is held back for memory)."""

    def __init__(self, uuid: str, nvml: Any = None, max_age_s: float = 0.5) -> None:
        self.uuid = uuid
        self._uuids = [u for u in uuid.split(",") if u]
        self._nvml = nvml
        self._handles: list[Any] = []
        self._max_age_s = max_age_s
        self._lock = threading.Lock()  # the handler's thread (ctx) and the helper thread (claims) both ask
        self._read_at = -max_age_s
        self._memory: GpuMemory | None = None

    def memory(self, fresh: bool = False) -> GpuMemory | None:
        """Its memory, read at most ``max_age_s`` ago (``fresh``: now)."""
        if not self._uuids or self.uuid.startswith("virtual"):
            return None
        with self._lock:
            if fresh or time.monotonic() - self._read_at >= self._max_age_s:
                self._memory = self._read()
                self._read_at = time.monotonic()
            return self._memory

    def _read(self) -> GpuMemory | None:
        try:
            if not self._handles:
                self._nvml = self._nvml or load_nvml()
                if self._nvml is None:
                    return None
                self._nvml.nvmlInit()
                self._handles = [self._nvml.nvmlDeviceGetHandleByUUID(u) for u in self._uuids]
            mem = min((read_memory(self._nvml, h, {os.getpid()}) for h in self._handles), key=lambda m: m.free_mb)
        except Exception as exc:  # noqa: BLE001 - a GPU fallen off the bus is the health check's to report
            log.warning("cannot read the GPU's memory from NVML", uuid=self.uuid, error=str(exc))
            self._handles = []
            return None
        # In a container NVML may not list this process under its own PID: torch's allocator says what it holds.
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            reserved = int(torch.cuda.memory_reserved()) // MB
            if reserved > mem.own_mb:
                return GpuMemory(mem.total_mb, mem.free_mb, mem.used_mb, min(reserved, mem.used_mb))
        return mem
