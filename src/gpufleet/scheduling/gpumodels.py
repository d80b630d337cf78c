"""GPU models by series: what a function asks for (``H100``) and what NVML names a device (``NVIDIA H100 80GB
HBM3``) meet at the series. A function may name a model as NVML does, or only its series, in any case; a name that is
no known series fails at load, since its tasks would wait for a GPU that no worker reports.
"""

from __future__ import annotations

import re

from gpufleet.errors import ConfigError, did_you_mean

ANY = "any"
MIG_PROFILE_RE = re.compile(r"[1-7]g\.\d+gb(?:\+\w+)?")  # NVIDIA's MIG profile names: 1g.10gb, 3g.40gb, 1g.10gb+me
MIG_SLICES = 7  # compute slices of an A100's or H100's: a profile's "<n>g" is n of them
# Series, most specific first, so "NVIDIA GH200 480GB" is GH200, not H200.
# fmt: skip below: a list of names reads better packed than one per line.
SERIES = ("GH200", "GB200", "H200", "H100", "H800", "H20", "B200", "B100", "A100", "A800", "A10G", "A10", "A30",
          "A40", "L40S", "L40", "L4", "T4", "V100", "P100", "RTX")  # fmt: skip
_PATTERNS = [(s, re.compile(rf"(^|[^A-Z0-9]){s}([^A-Z0-9]|$)")) for s in SERIES]


def series_of(name: str) -> str | None:
    """``"NVIDIA H100 80GB HBM3"``, ``"h100"`` or ``"H100-SXM"`` -> ``"H100"``; None for no known series."""
    upper = name.upper()
    return next((series for series, pattern in _PATTERNS if pattern.search(upper)), None)


def model_of(name: str) -> str:
    """A device's model for the inventory and its queues: its series, or a sanitized form of a name of no known series
    (such a GPU serves functions that ask for ``any``)."""
    return series_of(name) or re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[:32] or "unknown"


def check_model(model: str, key: str) -> str:
    """The series a function (or a worker's virtual GPUs) asks for, or ``any``.

    Raises:
        ConfigError: for a name of no known series.
    """
    if model.lower() == ANY:
        return ANY
    series = series_of(model)
    if series is None:
        hint = did_you_mean(model.upper(), SERIES)
        raise ConfigError(
            f"no GPU series in {model!r}",
            key=key,
            fix=f"{hint + ' ' if hint else ''}use 'any' or one of {', '.join(SERIES)}",
        )
    return series
