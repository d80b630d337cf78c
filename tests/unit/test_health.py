"""What makes a GPU broken (gpufleet.worker.health), read from the fake NVML as the supervisor reads a real one."""

from __future__ import annotations

from gpufleet.dev import fakenvml
from gpufleet.dev.fakenvml import FakeGpus
from gpufleet.worker.gpus import Sampler, discover, virtual_gpus
from gpufleet.worker.health import Health, HealthWatch


def watch(fake: FakeGpus) -> HealthWatch:
    fakenvml.nvmlInit()
    return HealthWatch(fakenvml, list(range(len(fake.gpus))))


def test_a_critical_xid_breaks_the_gpu_once_and_an_applications_own_does_not(fake_gpus: FakeGpus) -> None:
    fake_gpus.add()
    fake_gpus.add()
    fake_gpus.xid(1, 48)  # before the watch: NVML reports only what happens after it registered
    health = watch(fake_gpus)
    fake_gpus.xid(0, 13)  # a handler's illegal memory access: the application's, not the GPU's
    fake_gpus.xid(1, 79)
    health.poll()
    assert health.check(0).broken is None
    broken = health.check(1)
    assert broken.broken == "XID 79: fallen off the bus" and broken.facts["last_xid"] == 79
    assert health.check(1).broken is None  # counted once: the cordon is what lasts


def test_ecc_errors_retired_pages_and_a_lost_gpu_break_it(fake_gpus: FakeGpus) -> None:
    for _ in range(4):
        fake_gpus.add()
    health = watch(fake_gpus)
    fake_gpus.set(0, ecc_uncorrected=2)
    fake_gpus.set(1, pages_pending=True)
    fake_gpus.set(2, lost=True)
    assert health.check(0).broken == "2 double-bit ECC errors since its last reset"
    assert health.check(1).broken == "retired memory pages wait for a GPU reset"
    assert health.check(2).broken == "fallen off the bus (NVML: GPU is lost)"
    assert health.check(3) == Health(facts={"throttle_reasons": 0, "temperature_c": 40, "power_w": 70.0})


def test_throttling_is_a_warning_not_a_break(fake_gpus: FakeGpus) -> None:
    fake_gpus.add()
    fake_gpus.set(0, throttle=0x40 | 0x80, temperature=91, power_w=650)
    health = watch(fake_gpus).check(0)
    assert health.broken is None
    assert health.warnings == ("clocks throttled: hardware thermal slowdown", "clocks throttled: power brake slowdown")
    assert health.facts == {"throttle_reasons": 0xC0, "temperature_c": 91, "power_w": 650.0}


def test_the_sampler_reports_each_gpus_health_and_a_virtual_one_is_healthy(fake_gpus: FakeGpus) -> None:
    fake_gpus.add()
    [gpu] = discover(fakenvml)
    sampler = Sampler([gpu, *virtual_gpus(1)], fakenvml)
    fake_gpus.set(0, ecc_uncorrected=1)
    healths = sampler.health([gpu, *virtual_gpus(1)])
    assert healths["gpu0"].broken is not None and healths["vgpu0"] == Health()
