# ruff: noqa: N802 - FakeNvml mirrors pynvml's camelCase API
"""GPU discovery against a faked NVML (there is no GPU here), and the per-GPU slot plan built from it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gpufleet.config import load_fleet
from gpufleet.errors import ConfigError
from gpufleet.functions import Gpu
from gpufleet.scheduling.gpumodels import model_of
from gpufleet.worker.gpus import discover
from gpufleet.worker.supervisor import plan_slots

CONFIG = Path(__file__).parents[2] / "config" / "fleet.yaml"

FUNCTIONS = Path(__file__).parents[1] / "functions"


class FakeNvml:
    def __init__(self, names: list[str], fail_init: bool = False) -> None:
        self.names = names
        self.fail_init = fail_init
        self.shutdown_called = False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shutdown_called = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self.names[h].encode()  # older pynvml returns bytes

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h:04d}"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(total=80 * 1024**3, used=(h + 1) * 1024**3)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        if self.names[h] == "broken":
            raise RuntimeError("GPU is lost")
        return SimpleNamespace(gpu=40 + h, memory=10)


@pytest.mark.parametrize(
    ("name", "model"),
    [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA GH200 480GB", "GH200"), ("NVIDIA A100-SXM4-40GB", "A100"),
     ("Tesla T4", "T4"), ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"), ("Quadro Mystery 9000", "Quadro-Mystery-9000")],
)  # fmt: skip
def test_model_names(name: str, model: str) -> None:
    assert model_of(name) == model


def test_discover_lists_every_gpu_and_shuts_nvml_down() -> None:
    nvml = FakeNvml(["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"])
    gpus = discover(nvml)
    assert [(g.index, g.model, g.uuid, g.memory_mb) for g in gpus] == [
        (0, "H100", "GPU-0000", 81920), (1, "H100", "GPU-0001", 81920), (2, "A100", "GPU-0002", 81920)]  # fmt: skip
    assert nvml.shutdown_called


def test_no_driver_means_no_gpus() -> None:
    assert discover(FakeNvml([], fail_init=True)) == []


def test_one_pinned_slot_per_gpu_consuming_its_model_queues() -> None:
    fleet = load_fleet(CONFIG, env={})
    slots = plan_slots(fleet, discover(FakeNvml(["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"])))
    assert [s.name for s in slots] == ["gpu0", "gpu1"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1"]
    # Each function's queue (all of them take any GPU), then the pool and model queues of earlier releases.
    functions = [f"gpufleet.default.any.{name}" for name in fleet.functions]
    assert slots[0].queues == [*functions, "gpufleet.default.h100", "gpufleet.default.any"]
    assert slots[1].queues == [*functions, "gpufleet.default.a100", "gpufleet.default.any"]


def test_virtual_gpus_when_none_found() -> None:
    fleet = load_fleet(CONFIG, env={"GPUFLEET_WORKER__VIRTUAL_GPUS": "3", "GPUFLEET_WORKER__POOLS": "[eu, us]"})
    slots = plan_slots(fleet, [])
    assert [s.name for s in slots] == ["vgpu0", "vgpu1", "vgpu2"]
    assert all(s.env["CUDA_VISIBLE_DEVICES"] == "" for s in slots)  # the handler sees no CUDA device
    assert slots[0].queues == ["gpufleet.eu.virtual", "gpufleet.eu.any", "gpufleet.us.virtual", "gpufleet.us.any"]


@pytest.mark.parametrize(
    ("asked", "series"),
    [("H100", "H100"), ("h100", "H100"), ("NVIDIA H100 80GB HBM3", "H100"), ("A100-SXM4-40GB", "A100"),
     ("a10g", "A10G"), ("GB200", "GB200"), ("ANY", "any")],
)  # fmt: skip
def test_a_function_asks_for_a_series_named_as_nvml_names_it_or_short(asked: str, series: str) -> None:
    assert Gpu(model=asked).model == series


@pytest.mark.parametrize(("asked", "hint"), [("H101", "did you mean 'H100'?"), ("Quadro Mystery 9000", "use 'any'")])
def test_a_model_of_no_known_series_fails_at_load(asked: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=r"gpu\.model") as err:
        Gpu(model=asked)
    assert hint in str(err.value)


@pytest.mark.parametrize(
    ("gpu", "key"),
    [({"pools": ("eu", "eu")}, "gpu.pools"), ({"pools": ("eu.west",)}, "gpu.pools"), ({"pools": ()}, "gpu.pools"),
     ({"max_queue_wait_s": 0}, "gpu.max_queue_wait_s")],
)  # fmt: skip
def test_pools_are_distinct_names_without_dots_and_the_wait_limit_positive(gpu: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Gpu(**gpu)
    assert Gpu(pools=("eu-west", "us_east"), max_queue_wait_s=30).max_queue_wait_s == 30


def test_virtual_gpus_stand_for_the_configured_series_and_serve_its_functions(tmp_path: Path) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text(f"functions: [{FUNCTIONS}]\ntriggers: []\n")
    env = {"GPUFLEET_WORKER__VIRTUAL_GPUS": "2"}
    fleet = load_fleet(config, env={**env, "GPUFLEET_WORKER__GPU_MODEL": "nvidia h100 pcie"})
    slots = plan_slots(fleet, [])
    assert [s.gpu.model for s in slots] == ["H100", "H100"] and all(s.gpu.virtual for s in slots)
    assert "gpufleet.default.h100.needs_h100" in slots[0].queues and "gpufleet.default.any.echo" in slots[0].queues
    a10 = plan_slots(load_fleet(config, env={**env, "GPUFLEET_WORKER__GPU_MODEL": "A10G"}), [])
    assert "gpufleet.default.h100.needs_h100" not in a10[0].queues and "gpufleet.default.any.echo" in a10[0].queues
    for bad, why in (("H101", "did you mean 'H100'?"), ("any", "a GPU is of one series")):
        with pytest.raises(ConfigError, match="gpu_model") as err:
            load_fleet(config, env={**env, "GPUFLEET_WORKER__GPU_MODEL": bad})
        assert why in str(err.value)
    with pytest.raises(ConfigError, match="pools"):  # a pool's name is part of its queues' names
        load_fleet(config, env={**env, "GPUFLEET_WORKER__POOLS": "[eu.west]"})


def test_the_inventory_groups_by_pool_and_model_and_a_host_in_two_pools_counts_in_each() -> None:
    from gpufleet.control.views import group_gpus

    def gpu(worker: str, model: str, pools: list[str], task: str | None = None, stale: bool = False) -> dict[str, Any]:
        return {"worker": worker, "host": worker.split("@")[1], "model": model, "pools": pools, "task_id": task,
                "stale": stale}  # fmt: skip

    entries = [gpu("gpu0@a", "H100", ["eu"], task="t1"), gpu("gpu1@a", "H100", ["eu"]),
               gpu("gpu0@b", "H100", ["eu", "us"]), gpu("gpu0@c", "A10G", ["us"], stale=True)]  # fmt: skip
    assert group_gpus(entries) == [
        {"pool": "eu", "model": "H100", "gpus": 3, "busy": 1, "idle": 2, "stale": 0, "hosts": ["a", "b"]},
        {"pool": "us", "model": "A10G", "gpus": 1, "busy": 0, "idle": 0, "stale": 1, "hosts": []},
        {"pool": "us", "model": "H100", "gpus": 1, "busy": 0, "idle": 1, "stale": 0, "hosts": ["b"]},
    ]


def test_sampler_without_a_driver_reports_the_static_facts() -> None:
    from gpufleet.worker.gpus import GpuInfo, Sampler

    gpu = GpuInfo(index=0, name="NVIDIA L4", model="L4", uuid="GPU-1", memory_mb=23034)
    facts = Sampler([gpu], FakeNvml(["NVIDIA L4"], fail_init=True)).sample(gpu)
    assert facts["memory_total_mb"] == 23034 and facts["memory_used_mb"] is None and facts["utilization_pct"] is None
