"""GPU discovery and memory against the fake NVML (there is no GPU here), and the per-GPU slot plan built from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from gpufleet import function
from gpufleet.config import load_fleet
from gpufleet.dev import fakenvml
from gpufleet.dev.fakenvml import FakeGpus
from gpufleet.errors import ConfigError
from gpufleet.functions import Gpu
from gpufleet.scheduling.estimate import has_room
from gpufleet.scheduling.gpumodels import model_of
from gpufleet.worker.gpus import Device, GpuInfo, GpuMemory, Sampler, discover
from gpufleet.worker.slots import plan_slots

CONFIG = Path(__file__).parents[2] / "config" / "fleet.yaml"

FUNCTIONS = Path(__file__).parents[1] / "functions"


@pytest.mark.parametrize(
    ("name", "model"),
    [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA GH200 480GB", "GH200"), ("NVIDIA A100-SXM4-40GB", "A100"),
     ("Tesla T4", "T4"), ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"), ("Quadro Mystery 9000", "Quadro-Mystery-9000")],
)  # fmt: skip
def test_model_names(name: str, model: str) -> None:
    assert model_of(name) == model


def test_discover_lists_every_gpu(fake_gpus: FakeGpus) -> None:
    fake_gpus.add("NVIDIA H100 80GB HBM3")
    fake_gpus.add("NVIDIA H100 80GB HBM3")
    fake_gpus.add("NVIDIA A100-SXM4-40GB", memory_gb=40)
    assert [(g.index, g.model, g.uuid, g.memory_mb) for g in discover(fakenvml)] == [
        (0, "H100", fake_gpus.uuid(0), 81920), (1, "H100", fake_gpus.uuid(1), 81920),
        (2, "A100", fake_gpus.uuid(2), 40960)]  # fmt: skip


def test_no_driver_means_no_gpus() -> None:
    assert discover(fakenvml) == []  # nvmlInit fails: NVML's library is not there


def test_one_pinned_slot_per_gpu_consuming_its_model_queues(fake_gpus: FakeGpus) -> None:
    fleet = load_fleet(CONFIG, env={})
    fake_gpus.add("NVIDIA H100 80GB HBM3")
    fake_gpus.add("NVIDIA A100-SXM4-80GB")
    slots = plan_slots(fleet, discover(fakenvml))
    assert [s.name for s in slots] == ["gpu0", "gpu1"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1"]
    # Each function's queue (all of them take any GPU), then the pool and model queues of earlier releases.
    functions = [f"gpufleet.default.any.{name}" for name in fleet.functions]
    assert slots[0].queues == [*functions, "gpufleet.default.h100", "gpufleet.default.any"]
    assert slots[1].queues == [*functions, "gpufleet.default.a100", "gpufleet.default.any"]


def test_a_host_runs_a_worker_per_aligned_group_of_gpus_for_the_functions_that_need_several(
    fake_gpus: FakeGpus, tmp_path: Path
) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text(f"functions: [{Path(__file__).parents[1] / 'functions_gpus'}]\ntriggers: []\n")
    fleet = load_fleet(config, env={})
    for _ in range(5):
        fake_gpus.add("NVIDIA H100 80GB HBM3")
    slots = plan_slots(fleet, discover(fakenvml))
    assert [s.name for s in slots] == ["gpu0", "gpu1", "gpu2", "gpu3", "gpu4", "gpu0-1", "gpu2-3"]  # 4 is alone
    assert [s.holds for s in slots] == [(0,), (1,), (2,), (3,), (), (0, 1), (2, 3)]  # gpu4 shares with nobody
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots[5:]] == ["0,1", "2,3"]
    assert slots[5].env["GPUFLEET_GPUS"] == "gpu0,gpu1" and slots[5].queues == ["gpufleet.default.any.pair"]
    assert "gpufleet.default.any.pair" not in slots[0].queues and "gpufleet.default.any.single" in slots[0].queues


def test_a_gpu_in_mig_mode_is_its_instances_each_a_worker_pinned_by_uuid(fake_gpus: FakeGpus, tmp_path: Path) -> None:
    fake_gpus.add("NVIDIA H100 80GB HBM3")
    fake_gpus.add("NVIDIA H100 80GB HBM3")
    uuids = fake_gpus.mig(0, ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"])
    gpus = discover(fakenvml)
    assert [(g.label, g.kind, g.memory_mb, g.uuid) for g in gpus] == [
        ("gpu0.mig0", "H100:3g.40gb", 40960, uuids[0]), ("gpu0.mig1", "H100:2g.20gb", 20480, uuids[1]),
        ("gpu0.mig2", "H100:1g.10gb", 10240, uuids[2]), ("gpu0.mig3", "H100:1g.10gb", 10240, uuids[3]),
        ("gpu1", "H100", 81920, fake_gpus.uuid(1))]  # fmt: skip
    config = tmp_path / "fleet.yaml"
    config.write_text(f"functions: [{Path(__file__).parents[1] / 'functions_gpus'}]\ntriggers: []\n")
    slots = plan_slots(load_fleet(config, env={}), gpus)
    served = {s.name: sorted(q.rsplit(".", 1)[1] for q in s.queues if ".any." in q) for s in slots}
    assert served == {
        "gpu0.mig0": ["small"],
        "gpu0.mig1": ["small"],  # 8 GiB fits; tiny is 1g.10gb's alone
        "gpu0.mig2": ["small", "tiny"],
        "gpu0.mig3": ["small", "tiny"],
        "gpu1": ["single", "small"],
    }  # fmt: skip  (a whole GPU: no MIG profile; no pair for one whole GPU)
    assert slots[2].env["CUDA_VISIBLE_DEVICES"] == uuids[2] and slots[4].env["CUDA_VISIBLE_DEVICES"] == "1"


@pytest.mark.parametrize("count", [0, 3, 16, True])
def test_a_task_needs_1_2_4_or_8_gpus(count: int) -> None:
    with pytest.raises(ConfigError, match=r"gpu\.count"):
        Gpu(count=count)


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
    gpu = GpuInfo(index=0, name="NVIDIA L4", model="L4", uuid="GPU-1", memory_mb=23034)
    facts = Sampler([gpu], fakenvml).sample(gpu)
    assert facts["memory_total_mb"] == 23034 and facts["memory_used_mb"] is None and facts["utilization_pct"] is None


def test_memory_held_by_other_processes_is_told_apart_from_the_workers_own(fake_gpus: FakeGpus) -> None:
    fake_gpus.add("NVIDIA L4", memory_gb=24, reserved_mb=300)
    fake_gpus.hold(0, 30 * 1024 // 4, pid=os.getpid())  # this "worker" holds 7.5 GB
    fake_gpus.hold(0, 10 * 1024, pid=1)  # and another process 10 GB
    [gpu] = discover(fakenvml)
    facts = Sampler([gpu], fakenvml).sample(gpu, own_pids={os.getpid()})
    assert (facts["memory_total_mb"], facts["memory_used_mb"], facts["memory_free_mb"]) == (24576, 18220, 6356)
    assert facts["memory_others_mb"] == 10540  # the other process and the driver's own
    device = Device(fake_gpus.uuid(0), fakenvml, max_age_s=0)
    assert device.memory() == GpuMemory(24576, 6356, 18220, 7680)
    assert device.memory().room_mb == 6356 + 7680  # type: ignore[union-attr]
    fake_gpus.release(0, 1)
    assert device.memory().others_mb == 300  # type: ignore[union-attr]


def test_a_gpus_memory_is_read_at_most_every_so_often_and_unknown_when_it_is_lost(fake_gpus: FakeGpus) -> None:
    fake_gpus.add("NVIDIA H100 80GB HBM3")
    device = Device(fake_gpus.uuid(0), fakenvml, max_age_s=60)
    assert device.memory() == GpuMemory(81920, 81920, 0, 0)
    fake_gpus.hold(0, 1024, pid=1)
    assert device.memory() == GpuMemory(81920, 81920, 0, 0)  # within max_age_s: the last reading
    fake_gpus.set(0, lost=True)
    assert Device(fake_gpus.uuid(0), fakenvml).memory() is None  # fallen off the bus: nothing is held back for memory
    assert Device("").memory() is None and Device("virtual-0").memory() is None


def test_a_group_of_gpus_has_the_memory_of_its_tightest_gpu(fake_gpus: FakeGpus) -> None:
    """A worker for tasks of two GPUs: a task that needs 20 GB a GPU fits only if each of them has it."""
    for _ in range(2):
        fake_gpus.add("NVIDIA H100 80GB HBM3")
    fake_gpus.hold(1, 70 * 1024, pid=1)  # another process holds most of the second GPU
    pair = Device(f"{fake_gpus.uuid(0)},{fake_gpus.uuid(1)}", fakenvml, max_age_s=0)
    assert pair.memory() == GpuMemory(81920, 10240, 71680, 0)
    fake_gpus.release(1, 1)
    fake_gpus.hold(0, 1024, pid=1)
    assert pair.memory() == GpuMemory(81920, 80896, 1024, 0)


def test_a_gpu_smaller_than_a_function_needs_never_reads_its_queues(fake_gpus: FakeGpus) -> None:
    fake_gpus.add("NVIDIA L4", memory_gb=24)
    fake_gpus.add("NVIDIA H100 80GB HBM3")
    config = Path(__file__).parents[2] / "config" / "fleet.yaml"
    fleet = load_fleet(config, env={})
    fleet.functions["sized"] = function(name="sized", gpu_memory_gb=40)(lambda event, ctx: None)
    small, big = plan_slots(fleet, discover(fakenvml))
    assert "gpufleet.default.any.sized" not in small.queues and "gpufleet.default.any.sized" in big.queues
    assert small.queues[0] == big.queues[0]  # every other function on both
    assert "gpufleet.default.any.sized" in plan_slots(fleet, [])[0].queues  # a virtual GPU's memory is unknown


@pytest.mark.parametrize("bad", [0, -1, 5000, True])
def test_memory_gb_is_a_positive_size(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"gpu\.memory_gb"):
        Gpu(memory_gb=bad)
    assert Gpu(memory_gb=0.5).memory_mb == 512 and Gpu(memory_gb=20.001).memory_mb == 20482


def test_gpu_memory_gb_is_a_shorthand_said_once() -> None:
    fn = function(name="f", gpu=Gpu(model="H100"), gpu_memory_gb=20)(lambda event, ctx: None)
    assert (fn.gpu.model, fn.gpu.memory_gb) == ("H100", 20)
    with pytest.raises(ConfigError, match="say it once"):
        function(name="f", gpu=Gpu(memory_gb=10), gpu_memory_gb=20)


def test_a_gpu_has_room_for_all_but_what_other_processes_hold() -> None:
    entry = {"memory_total_mb": 81920, "memory_others_mb": 61440}
    assert has_room(entry, 20480) and not has_room(entry, 20481) and has_room(entry, None)
    assert has_room({"memory_total_mb": 0, "memory_others_mb": None}, 10**6)  # a virtual GPU: unknown


def test_the_fake_nvml_shows_a_gpu_in_mig_mode_with_its_instances(fake_gpus: FakeGpus) -> None:
    """What gpufleet reads of MIG: the mode, the most instances (7, as a real GPU says, though it has 2), and each
    instance's handle, UUID, name and memory."""
    fake_gpus.add("NVIDIA A100-SXM4-80GB")
    uuids = fake_gpus.mig(0, ["3g.40gb", "2g.20gb"])
    fakenvml.nvmlInit()
    gpu = fakenvml.nvmlDeviceGetHandleByIndex(0)
    assert fakenvml.nvmlDeviceGetMigMode(gpu) == [1, 1] and fakenvml.nvmlDeviceGetMaxMigDeviceCount(gpu) == 7
    instances = [fakenvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, i) for i in range(2)]
    assert [fakenvml.nvmlDeviceGetUUID(h) for h in instances] == uuids
    assert fakenvml.nvmlDeviceGetMemoryInfo(instances[0]).total == 40 * 1024**3
    assert fakenvml.nvmlDeviceIsMigDeviceHandle(instances[1]) and not fakenvml.nvmlDeviceIsMigDeviceHandle(gpu)
    with pytest.raises(fakenvml.NVMLError):
        fakenvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 2)  # no instance there
    assert fakenvml.nvmlDeviceGetHandleByUUID(uuids[1]) == instances[1]
    fake_gpus.mig(0, [])
    assert fakenvml.nvmlDeviceGetMigMode(gpu) == [0, 0]
