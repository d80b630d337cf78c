"""GPU discovery with NVML (pynvml, from nvidia-ml-py).

NVML is not CUDA: querying it does not create a CUDA context, so the supervisor may call it before it starts the
per-GPU processes. We still shut NVML down right after, and never import torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from gpufleet.scheduling.gpumodels import model_of

log = structlog.get_logger("gpufleet.gpus")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    model: str
    uuid: str
    memory_mb: int
    virtual: bool = False

    @property
    def label(self) -> str:
        return f"{'vgpu' if self.virtual else 'gpu'}{self.index}"


def discover(nvml: Any = None) -> list[GpuInfo]:
    """The GPUs NVML sees, or [] when there is no driver or no device. ``nvml`` is for tests: a fake module."""
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            return []
        nvml = pynvml
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

    def _init(self) -> bool:
        if self._ready or not any(not g.virtual for g in self._gpus):
            return self._ready
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._ready = True
        except Exception as exc:  # noqa: BLE001 - no driver: report the static facts only
            log.info("NVML unavailable for sampling", reason=str(exc))
            self._gpus = [g for g in self._gpus if g.virtual]
        return self._ready

    def sample(self, gpu: GpuInfo) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "index": gpu.index,
            "name": gpu.name,
            "model": gpu.model,
            "uuid": gpu.uuid,
            "virtual": gpu.virtual,
            "memory_total_mb": gpu.memory_mb,
            "memory_used_mb": None,
            "utilization_pct": None,
        }
        if gpu.virtual or not self._init():
            return facts
        try:
            handle = self._nvml.nvmlDeviceGetHandleByIndex(gpu.index)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            facts["memory_total_mb"] = int(mem.total // 2**20)
            facts["memory_used_mb"] = int(mem.used // 2**20)
            facts["utilization_pct"] = int(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception as exc:  # noqa: BLE001 - a GPU fallen off the bus must not stop the supervisor
            log.warning("NVML query failed", gpu=gpu.index, error=str(exc))
        return facts

    def close(self) -> None:
        if self._ready:
            self._ready = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down anyway: nothing to do but log it
                log.debug("NVML shutdown failed", exc_info=True)
