"""The windows `gpufleet usage` reads, and the prices it reads them at."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.config import load_fleet
from gpufleet.control.usage import parse_since
from gpufleet.errors import ConfigError, InvalidRequestError
from gpufleet.worker.bundle import ProcessBundle

CONFIG = Path(__file__).parents[2] / "config" / "fleet.yaml"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90m", 5400), ("24h", 86400), ("7d", 604800), ("3600", 3600), ("99d", 35 * 86400)]
)
def test_a_window_is_minutes_hours_or_days(text: str, seconds: float) -> None:
    assert parse_since(text) == seconds


@pytest.mark.parametrize("text", ["", "0h", "-1h", "1.5h", "yesterday", "1w"])
def test_a_window_that_is_no_window_is_refused(text: str) -> None:
    with pytest.raises(InvalidRequestError, match="90m, 24h or 7d"):
        parse_since(text)


def test_prices_are_per_gpu_series_and_never_negative() -> None:
    fleet = load_fleet(CONFIG, env={"GPUFLEET_WORKER__GPU_HOUR_PRICE": '{"NVIDIA H100 80GB HBM3": 2.49, "l4": 0.8}'})
    assert fleet.settings.worker.gpu_hour_price == {"H100": 2.49, "L4": 0.8}
    for bad, why in (('{"H101": 1}', "H100"), ('{"H100": -1}', ">= 0")):
        with pytest.raises(ConfigError, match="gpu_hour_price") as err:
            load_fleet(CONFIG, env={"GPUFLEET_WORKER__GPU_HOUR_PRICE": bad})
        assert why in str(err.value)
    bundle = ProcessBundle(fleet, "gpu0.mig2@h", "gpu0.mig2:H100:2g.20gb")
    assert bundle.gpu_model == "H100:2g.20gb" and bundle.gpu_hour_price == pytest.approx(2.49 * 2 / 7)  # 2 slices of 7
    assert ProcessBundle(fleet, "gpu1@h", "gpu1:L4").gpu_hour_price == 0.8
