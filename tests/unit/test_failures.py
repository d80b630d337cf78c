"""Failures that cannot succeed are not retried: they fail at once, and the error names the function and the cause."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet.errors import ConfigError
from gpufleet.functions import function


def test_a_handler_that_cannot_take_event_and_ctx_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"one_arg\(event.*cannot be called as def handler\(event, ctx\)"):

        @function(name="one_arg")
        def one_arg(event: object) -> None: ...

    def flexible(event: object, ctx: object, extra: int = 0, *rest: object) -> None: ...

    function(name="flexible")(flexible)  # defaults and *args are fine

    (tmp_path / "workers").mkdir()
    (tmp_path / "workers" / "bad.py").write_text(
        "from gpufleet import function\n\n@function(name='bad')\ndef bad(event):\n    return event\n"
    )
    (tmp_path / "fleet.yaml").write_text("functions: [workers]\ntriggers: []\n")
    check = subprocess.run([sys.executable, "-m", "gpufleet", "check", "--config", str(tmp_path / "fleet.yaml")],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode != 0
    assert "bad.py" in check.stderr and "cannot be called as def handler(event, ctx)" in check.stderr
