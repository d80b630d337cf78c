"""One keyspace: every Redis key of the fleet is spelled in gpufleet.registry.keyspace, and every Lua script is a file
beside it that loads and compiles."""

from __future__ import annotations

from gpufleet.registry.keyspace import script
from tests.harness import FleetHarness
from tests.unit.test_keyspace import SCRIPTS, SHARED


def test_every_script_compiles_in_redis(harness: FleetHarness) -> None:
    for name in sorted(set(SCRIPTS) - SHARED):
        harness.redis.script_load(script(name))  # a Lua syntax error is a ResponseError here
