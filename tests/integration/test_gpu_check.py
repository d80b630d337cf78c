"""``make gpu-check`` (bench/gpu_check.py): without a GPU it says so in one line and exits 0; rehearsed on a fake NVML
GPU and torch's CPU device, every check of its table runs and passes, so the script is ready for a real GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet.worker.gpus import discover, load_nvml

SCRIPT = Path(__file__).parents[2] / "bench" / "gpu_check.py"


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0() -> None:
    if discover(load_nvml()):
        pytest.skip("this machine has an NVIDIA GPU: make gpu-check runs the real check")
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "gpu-check: no NVIDIA GPU here (NVML found none): nothing to check\n"


def test_a_rehearsal_runs_every_check_of_the_table() -> None:
    argv = [sys.executable, str(SCRIPT), "--rehearse", "--tasks", "6", "--batch", "48"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    # Exit 1 for a figure off its mark (gpu_seconds within 1 % of the handlers' time) is the loaded test machine's,
    # not the script's: every check must run, and none fail.
    assert done.returncode in (0, 1) and "| FAILED" not in done.stdout, done.stdout + done.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")}
    for check in ("NVML: GPU 0", "pinning: gpu0@", "matmul", "induced OOM, recovered", "gpu_seconds vs handler time",
                  "batching: an MLP", "duty cycle, 100 ms GPU tasks", "warm-model switch",
                  "task of 2 GPUs"):  # fmt: skip
        assert any(name.startswith(check) for name in rows), (check, done.stdout)
    assert "SUCCEEDED after 1 OOM retry, attempts 1" in done.stdout
    assert rows["task of 2 GPUs"].startswith("| task of 2 GPUs | ok | gpu0-1@"), rows["task of 2 GPUs"]
    assert rows["warm-model switch"].startswith("| warm-model switch | ok |"), rows["warm-model switch"]
