# ruff: noqa: N802, N816 - the functions and constants mirror pynvml's camelCase API
"""A fake NVML for machines without a GPU: the functions of ``pynvml`` gpufleet calls, answering from a JSON file
that a test (or a rehearsal) rewrites while the fleet runs.

Every process of a fleet whose ``worker.fake_nvml`` names the file (``GPUFLEET_WORKER__FAKE_NVML``) uses this module
instead of ``pynvml`` (see :func:`gpufleet.worker.gpus.load_nvml`): the supervisor, the worker processes and their
pool processes all read the same file, on every call, so what the file says now is what each of them sees. Write it
with :class:`FakeGpus`, which replaces the file in one rename (a reader never sees half of it)::

    gpus = FakeGpus(tmp_path / "nvml.json")
    gpus.add("NVIDIA H100 80GB HBM3", memory_gb=80)
    gpus.hold(0, mb=30 * 1024, pid=other.pid)    # another process holds 30 GB of GPU 0
    gpus.release(0, other.pid)

Only NVML is faked: the code that reads it is the code that reads a real GPU. Memory figures are bytes, as NVML's.
What it can be told: memory held by processes, utilisation, XID events, ECC errors, retired pages, throttling,
temperature, power, MIG mode, and a GPU fallen off the bus.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

MB = 1024 * 1024
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
nvmlEventTypeXidCriticalError = 0x8
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_TEMPERATURE_GPU = 0
NVML_ERROR_GPU_IS_LOST = 15
MIG_MAX = 7  # an A100's or H100's most MIG instances


class NVMLError(Exception):
    """pynvml's error: ``value`` is NVML's return code."""

    def __init__(self, value: int) -> None:
        self.value = value
        super().__init__(f"NVML error {value}")


_file: Path | None = None  # what use() named: this process's fake GPUs


def use(path: Path | None) -> None:
    """Answer from ``path`` from now on (None: as a machine without a driver, whose nvmlInit fails)."""
    global _file
    _file = path


def _state() -> dict[str, Any]:
    if _file is None:
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    return dict(json.loads(_file.read_text()))


def _gpu(handle: int) -> dict[str, Any]:
    gpus = _state()["gpus"]
    if not 0 <= handle < len(gpus):
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    gpu = dict(gpus[handle])
    if gpu.get("lost"):
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    return gpu


def nvmlInit() -> None:
    _state()


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(_state()["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    _gpu(index)
    return index


def nvmlDeviceGetHandleByUUID(uuid: str | bytes) -> int | tuple[int, int]:
    wanted = uuid.decode() if isinstance(uuid, bytes) else uuid
    for index, gpu in enumerate(_state()["gpus"]):
        if gpu["uuid"] == wanted:
            return index
        for place, instance in enumerate(gpu.get("mig") or []):
            if instance["uuid"] == wanted:
                return index, place
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetName(handle: int | tuple[int, int]) -> str:
    return str((_mig(handle) if isinstance(handle, tuple) else _gpu(handle))["name"])


def nvmlDeviceGetUUID(handle: int | tuple[int, int]) -> str:
    return str((_mig(handle) if isinstance(handle, tuple) else _gpu(handle))["uuid"])


def nvmlDeviceGetMemoryInfo(handle: int | tuple[int, int]) -> Any:
    gpu = _mig(handle) if isinstance(handle, tuple) else _gpu(handle)
    total = int(gpu["memory_mb"]) * MB
    used = min(total, (int(gpu.get("reserved_mb", 0)) + sum(int(p["used_mb"]) for p in gpu["processes"])) * MB)
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetComputeRunningProcesses(handle: int | tuple[int, int]) -> list[Any]:
    gpu = _mig(handle) if isinstance(handle, tuple) else _gpu(handle)
    return [SimpleNamespace(pid=int(p["pid"]), usedGpuMemory=int(p["used_mb"]) * MB) for p in gpu["processes"]]


def nvmlDeviceGetTotalEccErrors(handle: int, error_type: int, counter_type: int) -> int:
    return int(_gpu(handle).get("ecc_uncorrected", 0)) if error_type == NVML_MEMORY_ERROR_TYPE_UNCORRECTED else 0


def nvmlDeviceGetRetiredPagesPendingStatus(handle: int) -> int:
    return int(bool(_gpu(handle).get("pages_pending")))


def nvmlDeviceGetCurrentClocksThrottleReasons(handle: int) -> int:
    return int(_gpu(handle).get("throttle", 0))


def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
    return int(_gpu(handle).get("temperature", 40))


def nvmlDeviceGetPowerUsage(handle: int) -> int:
    return int(_gpu(handle).get("power_w", 70)) * 1000  # milliwatts


def nvmlDeviceGetMigMode(handle: int) -> list[int]:
    mig = int(bool(_gpu(handle).get("mig")))
    return [mig, mig]


def nvmlDeviceGetMaxMigDeviceCount(handle: int) -> int:
    return MIG_MAX if _gpu(handle).get("mig") else 0  # the most instances it could have, as a real GPU says


def nvmlDeviceGetMigDeviceHandleByIndex(handle: int, index: int) -> tuple[int, int]:
    if not 0 <= index < len(_gpu(handle).get("mig") or []):
        raise NVMLError(NVML_ERROR_NOT_FOUND)
    return handle, index  # a MIG instance's handle: its GPU's and its place there


def nvmlDeviceIsMigDeviceHandle(handle: int | tuple[int, int]) -> bool:
    return isinstance(handle, tuple)


def _mig(handle: tuple[int, int]) -> dict[str, Any]:
    return dict(_gpu(handle[0])["mig"][handle[1]])


class _EventSet:
    def __init__(self) -> None:
        self.seen: dict[int, int] = {}  # GPU -> its XIDs this set has reported (or that came before it registered)


def nvmlEventSetCreate() -> _EventSet:
    return _EventSet()


def nvmlDeviceRegisterEvents(handle: int, event_types: int, event_set: _EventSet) -> None:
    event_set.seen[handle] = len(_gpu(handle).get("xids", []))  # as NVML: only what happens from now on


def nvmlEventSetWait_v2(event_set: _EventSet, timeout_ms: int) -> Any:
    """The next XID of a registered GPU not reported yet; NVML's timeout error when there is none (at once: a
    fake has nothing to wait for)."""
    gpus = _state()["gpus"]
    for handle, seen in event_set.seen.items():
        xids = gpus[handle].get("xids", [])
        if len(xids) > seen:
            event_set.seen[handle] = seen + 1
            return SimpleNamespace(device=handle, eventType=nvmlEventTypeXidCriticalError, eventData=xids[seen])
    raise NVMLError(NVML_ERROR_TIMEOUT)


def nvmlDeviceGetUtilizationRates(handle: int | tuple[int, int]) -> Any:
    if isinstance(handle, tuple):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)  # none per MIG instance, as on a real GPU
    return SimpleNamespace(gpu=int(_gpu(handle).get("utilization", 0)), memory=0)


class FakeGpus:
    """Writes the file the fake NVML answers from. Each change is saved at once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.gpus: list[dict[str, Any]] = []
        if self.path.exists():
            self.gpus = json.loads(self.path.read_text())["gpus"]
        else:
            self._save()

    @property
    def env(self) -> dict[str, str]:
        """The environment that makes a fleet's processes see these GPUs."""
        return {"GPUFLEET_WORKER__FAKE_NVML": str(self.path)}

    def add(self, name: str = "NVIDIA H100 80GB HBM3", memory_gb: float = 80, reserved_mb: int = 0) -> int:
        """One more GPU; returns its index. ``reserved_mb``: what the driver itself holds (NVML counts it used)."""
        index = len(self.gpus)
        uuid = f"GPU-fake{index:04d}-0000-0000-0000-000000000000"
        self.gpus.append(
            {
                "name": name,
                "uuid": uuid,
                "memory_mb": int(memory_gb * 1024),
                "reserved_mb": reserved_mb,
                "processes": [],
                "utilization": 0,
                "lost": False,
            }
        )
        self._save()
        return index

    def uuid(self, index: int) -> str:
        return str(self.gpus[index]["uuid"])

    def hold(self, index: int, mb: int, pid: int, instance: int | None = None) -> None:
        """Process ``pid`` holds ``mb`` MiB of GPU ``index`` (of its MIG ``instance``), replacing what it held."""
        where = self.gpus[index] if instance is None else self.gpus[index]["mig"][instance]
        where["processes"] = [*(p for p in where["processes"] if p["pid"] != pid), {"pid": pid, "used_mb": mb}]
        self._save()

    def set(self, index: int, **facts: Any) -> None:
        """Change a GPU's facts: ``utilization`` (%), ``lost=True`` (fallen off the bus: every query of it fails),
        ``ecc_uncorrected`` (volatile double-bit ECC errors), ``pages_pending`` (retired pages waiting for a reset),
        ``throttle`` (NVML's clock throttle reasons, a bit mask), ``temperature`` (C), ``power_w``, ``mig``."""
        self.gpus[index].update(facts)
        self._save()

    def mig(self, index: int, profiles: list[str]) -> list[str]:
        """Put GPU ``index`` in MIG mode with instances of these profiles (``"3g.40gb"``: its memory is the number
        before ``gb``); returns their UUIDs. An empty list leaves MIG mode."""
        instances: list[dict[str, Any]] = [
            {
                "name": f"{self.gpus[index]['name']} MIG {profile}",
                "uuid": f"MIG-fake{index:04d}-{i:04d}",
                "memory_mb": int(profile.split(".")[1].removesuffix("gb")) * 1024,
                "processes": [],
            }
            for i, profile in enumerate(profiles)
        ]
        self.gpus[index]["mig"] = instances
        self._save()
        return [str(m["uuid"]) for m in instances]

    def xid(self, index: int, code: int) -> None:
        """An XID event on GPU ``index`` (79: fallen off the bus; 48: a double-bit ECC error; 13: an application's)."""
        self.gpus[index]["xids"] = [*self.gpus[index].get("xids", []), code]
        self._save()

    def release(self, index: int, pid: int) -> None:
        self.gpus[index]["processes"] = [p for p in self.gpus[index]["processes"] if p["pid"] != pid]
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".nvml-")
        with os.fdopen(fd, "w") as f:
            json.dump({"gpus": self.gpus}, f)
        os.replace(tmp, self.path)
