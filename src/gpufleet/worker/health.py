"""Is a GPU broken? NVML's signs, read by the supervisor at each inventory round.

Broken (the GPU is cordoned: see :mod:`gpufleet.worker.supervisor`):

- it fell off the bus: NVML answers ``GPU is lost`` for it;
- an XID event other than an application's own error (13, 31, 43, 45, 68, 109: what NVIDIA's Kubernetes device
  plugin skips too): 48 a double-bit ECC error, 63/64 page retirement, 74 NVLink, 79 fallen off the bus, 92 a high
  single-bit ECC rate, 94/95 contained or uncontained ECC errors, 119/120 GSP errors...;
- double-bit (uncorrected) ECC errors since its last reset;
- retired memory pages waiting for a reset.

A warning, not a cordon: clocks throttled by a hardware slowdown, heat or a power brake. A query the GPU does not
support (consumer cards have no ECC) says nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("gpufleet.health")
GPU_IS_LOST = 15  # NVML_ERROR_GPU_IS_LOST
TIMEOUT = 10  # NVML_ERROR_TIMEOUT: no event waiting
XID_CRITICAL = 0x8  # nvmlEventTypeXidCriticalError
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})
XID_MEANING = {
    48: "a double-bit ECC error",
    63: "a page retired",
    64: "a page retirement failed",
    74: "an NVLink error",
    79: "fallen off the bus",
    92: "a high single-bit ECC error rate",
    94: "a contained ECC error",
    95: "an uncontained ECC error",
    119: "a GSP timeout",
    120: "a GSP error",
}
THROTTLES = {
    0x8: "hardware slowdown",
    0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown",
    0x80: "power brake slowdown",
}


@dataclass(frozen=True)
class Health:
    broken: str | None = None  # why it must take no task; None: healthy
    warnings: tuple[str, ...] = ()
    facts: dict[str, Any] = field(default_factory=dict)  # temperature_c, power_w, throttle_reasons, last_xid


def _value(exc: Exception) -> int | None:
    return getattr(exc, "value", None)


class HealthWatch:
    """The GPUs' XID events (one NVML event set) and their health now. ``nvml`` is initialised by the caller."""

    def __init__(self, nvml: Any, indexes: list[int]) -> None:
        self.nvml = nvml
        self._xids: dict[int, int] = {}  # GPU index -> a critical XID seen since the last check of it
        self._handles: dict[int, Any] = {}
        self._events: Any = None
        try:
            self._events = nvml.nvmlEventSetCreate()
            for index in indexes:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                self._handles[index] = handle
                nvml.nvmlDeviceRegisterEvents(
                    handle, getattr(nvml, "nvmlEventTypeXidCriticalError", XID_CRITICAL), self._events
                )
        except Exception as exc:  # noqa: BLE001 - no XID events here (unsupported, or a GPU already lost)
            log.info("NVML XID events unavailable; health reads the other signs", error=str(exc))

    def poll(self) -> None:
        """Take the XID events waiting, without waiting for more."""
        if self._events is None:
            return
        for _ in range(1000):
            try:
                event = self.nvml.nvmlEventSetWait_v2(self._events, 0)
            except Exception as exc:  # noqa: BLE001 - NVMLError: a timeout is "none left"
                if _value(exc) != TIMEOUT:
                    log.warning("cannot read NVML events", error=str(exc))
                return
            index = next((i for i, h in self._handles.items() if h == event.device), None)
            if index is not None and int(event.eventData) not in APPLICATION_XIDS:
                self._xids[index] = int(event.eventData)
                log.error("GPU XID event", gpu=index, xid=int(event.eventData))

    def check(self, index: int) -> Health:
        """GPU ``index`` now (an XID counts once: the cordon it causes is what lasts)."""
        nvml, broken, warnings = self.nvml, None, []
        facts: dict[str, Any] = {}
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            nvml.nvmlDeviceGetMemoryInfo(handle)  # a GPU fallen off the bus fails here, if not above
        except Exception as exc:  # noqa: BLE001 - NVMLError
            if _value(exc) == GPU_IS_LOST:
                return Health(broken="fallen off the bus (NVML: GPU is lost)")
            return Health(warnings=(f"NVML cannot read it: {exc}",))
        xid = self._xids.pop(index, None)
        if xid is not None:
            facts["last_xid"] = xid
            broken = f"XID {xid}" + (f": {XID_MEANING[xid]}" if xid in XID_MEANING else "")
        ecc = _read(lambda: nvml.nvmlDeviceGetTotalEccErrors(handle, 1, 0))  # uncorrected, volatile
        if ecc:
            broken = broken or f"{ecc} double-bit ECC errors since its last reset"
        if _read(lambda: nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle)):
            broken = broken or "retired memory pages wait for a GPU reset"
        throttle = _read(lambda: nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))
        if throttle is not None:
            facts["throttle_reasons"] = int(throttle)
            warnings += [f"clocks throttled: {why}" for bit, why in THROTTLES.items() if int(throttle) & bit]
        temperature = _read(lambda: nvml.nvmlDeviceGetTemperature(handle, 0))
        if temperature is not None:
            facts["temperature_c"] = int(temperature)
        power = _read(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        if power is not None:
            facts["power_w"] = round(int(power) / 1000, 1)
        return Health(broken, tuple(warnings), facts)


def _read(query: Any) -> int | None:
    """A query's answer, or None where the GPU does not support it (or cannot say now)."""
    try:
        return int(query())
    except Exception:  # noqa: BLE001 - NVMLError_NotSupported and the like
        return None
