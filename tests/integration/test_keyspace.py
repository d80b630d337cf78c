"""One keyspace: every Redis key of the fleet is spelled in gpufleet.registry.keyspace, and every Lua script is a file
beside it that loads and compiles."""

from __future__ import annotations

import time

from gpufleet.registry.keyspace import CALLBACK_FIELDS, parked_fields, script, stream_entry
from gpufleet.registry.messages import MessageFactory
from gpufleet.registry.model import Callback, Enqueued, NewTask, State
from tests.harness import FleetHarness
from tests.unit.test_keyspace import SCRIPTS, SHARED


def test_every_script_compiles_in_redis(harness: FleetHarness) -> None:
    for name in sorted(set(SCRIPTS) - SHARED):
        harness.redis.script_load(script(name))  # a Lua syntax error is a ResponseError here


def test_the_callback_entry_a_finish_writes_is_the_format_keyspace_names_and_reads(harness: FleetHarness) -> None:
    """finish.lua and finish_queued.lua write a callback entry through add_callback (helpers.lua); its fields are
    keyspace.CALLBACK_FIELDS, in order, and keyspace.stream_entry reads it as the dispatcher does. A parked entry
    (keyspace.parked_fields) reads back the same way, with its reason."""
    fleet = harness.fleet()
    factory = MessageFactory(harness.prefix, 1.0)
    message = factory.build("cb-1", fleet.functions["echo"], {"k": 1}, {"source": "test", "traceparent": TP})
    task = NewTask(message, "kafka:///ok", "kafka:///bad", 3, "test", time.time(), origin="test")
    assert harness.registry.enqueue_many([task]) == [Enqueued.CREATED]
    assert harness.registry.claim("cb-1", "QUEUED", "", "w/1/2/a", 30, "w", "gpu0").ok
    done = harness.registry.finish("cb-1", "w/1/2/a", State.SUCCEEDED, {"result": "{}"},
                                   [Callback("kafka:///ok", b'{"r": 1}', "Success")])  # fmt: skip
    assert done
    [(_, fields)] = harness.redis.xrange(harness.registry.keys.callbacks)
    assert tuple(k.decode() for k in fields) == CALLBACK_FIELDS
    entry = stream_entry(fields)
    assert (entry.dest, entry.key, entry.value) == ("kafka:///ok", "cb-1", b'{"r": 1}')
    assert entry.headers == {"condition": "Success", "function": "echo", "traceparent": TP}
    harness.redis.xadd("parked-test", parked_fields("http://h/x", "cb-1", b"v", {"a": "b"}, "refused"))
    [(_, parked)] = harness.redis.xrange("parked-test")
    back = stream_entry(parked)
    assert (back.dest, back.key, back.value, back.headers, back.reason) == ("http://h/x", "cb-1", b"v", {"a": "b"},
                                                                           "refused")  # fmt: skip
    assert back.parked_at > 0


TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
