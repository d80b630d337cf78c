"""The package builds without the deprecation warnings that would stop a future setuptools from building it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_the_wheel_builds_cleanly_with_an_spdx_license(tmp_path: Path) -> None:
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    output = built.stdout + built.stderr
    assert "SetuptoolsDeprecationWarning" not in output and "License classifiers are deprecated" not in output
    [wheel] = tmp_path.glob("gpufleet-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        names = set(zf.namelist())
    assert "License-Expression: Apache-2.0" in metadata
    # The dashboard is served from the package: an installed fleet has its page, script and styles.
    assert {f"gpufleet/api/static/dashboard.{ext}" for ext in ("html", "js", "css")} <= names
    assert "gpufleet/py.typed" in names
