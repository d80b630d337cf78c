"""One keyspace: every Redis key of the fleet is spelled in gpufleet.registry.keyspace, and every Lua script is a file
beside it that loads and compiles."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpufleet.registry import keyspace
from gpufleet.registry.jobs import WAITING
from gpufleet.registry.keyspace import HISTOGRAM_BOUNDS, Keyspace, script

SRC = Path(__file__).resolve().parents[2] / "src" / "gpufleet"

SCRIPTS = sorted(p.stem for p in (SRC / "registry" / "scripts").glob("*.lua"))

SHARED = {"helpers", "create"}  # parts other scripts call, never run alone


def test_no_module_but_the_keyspace_spells_a_key() -> None:
    # A key is "<prefix>:<name>...": an f-string that puts a colon right after a prefix.
    spelled = re.compile(r"""f["'][^"']*\{[\w.]*prefix\}:[\w{]""")
    found = [f"{p.relative_to(SRC)}:{n}" for p in SRC.rglob("*.py") if p.name != "keyspace.py"
             for n, line in enumerate(p.read_text().splitlines(), 1) if spelled.search(line)]  # fmt: skip
    assert not found


def test_every_script_file_is_used_and_every_use_has_a_file() -> None:
    used = set()
    for path in SRC.rglob("*.py"):
        used |= set(re.findall(r"""(?<![\w.])script\(["'](\w+)["']\)""", path.read_text()))
    assert used == set(SCRIPTS) - SHARED


@pytest.mark.parametrize("name", sorted(set(SCRIPTS) - SHARED))
def test_each_script_composes_with_the_parts_it_calls(name: str) -> None:
    source = script(name)
    calls = set(re.findall(r"\b(\w+)\(", source))
    defined = set(re.findall(r"local function (\w+)\(", source))
    helpers = set(re.findall(r"local function (\w+)\(", (SRC / "registry/scripts/helpers.lua").read_text()))
    creates = {"create_tasks"}
    assert not (calls & (helpers | creates)) - defined, "a script calls a shared function it was not given"
    if "observe(" in source:
        assert "local BOUNDS = {" + ", ".join(map(str, HISTOGRAM_BOUNDS)) + "}" in source


def test_a_parked_job_s_owner_is_the_one_the_worker_knows() -> None:
    assert f"'{WAITING}'" in script("split")


def test_keys_of_one_prefix() -> None:
    keys = Keyspace("gf")
    assert (keys.task("t1"), keys.index("echo", "QUEUED"), keys.pending("gf.default.any")) == (
        "gf:task:t1", "gf:idx:echo:QUEUED", "gf:pending:gf.default.any")  # fmt: skip
    assert keys.metric("wait") == "gf:m:wait" and keys.flow_state("ab") == "gf:flow:ab:state"
    assert keyspace.CALLBACK_FIELDS[0] == "dest"
