"""Creating tasks: their records, queue positions and messages, in chunks of atomic scripts (``enqueue_many.lua``)
sent in one round trip (see :meth:`Registry.enqueue_many <gpufleet.registry.store.Registry.enqueue_many>`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from gpufleet.errors import BrokerError
from gpufleet.registry.connection import ScriptPipeline
from gpufleet.registry.model import REDIS_ERRORS, Enqueued, NewTask, task_row

# Tasks per enqueue script: ~20 us each inside Redis, so one call blocks other clients for about 2 ms at most.
CHUNK = 100
_ENQUEUED = {e.value: e for e in Enqueued}


def send(
    pipe: ScriptPipeline, script: Any, prefix: str, tasks: list[NewTask], replicas: tuple[int, int]
) -> Callable[[], list[Enqueued]]:
    """Send the ``enqueue_many`` scripts for ``tasks`` in ``pipe`` now; the call returned reads their answers.
    ``replicas``: (``redis.wait_replicas``, its timeout in ms): with replicas, a WAIT follows the scripts.

    Raises:
        BrokerError: Redis could not be reached (now, or when the answers are read), or too few replicas
            acknowledged.
    """
    if not tasks:
        return list
    now = repr(time.time())
    for start in range(0, len(tasks), CHUNK):
        chunk = tasks[start : start + CHUNK]
        batch = orjson.dumps([task_row(t, now) for t in chunk])
        args: list[str | bytes] = [prefix, now, batch]
        for t in chunk:  # as they are: the JSON text goes into the record unescaped, and Lua does not decode it
            args += (t.message.envelope, t.message.event, t.message.meta)
        script(args=args, client=pipe)
    wait_replicas, wait_timeout_ms = replicas
    if wait_replicas:
        pipe.execute_command("WAIT", wait_replicas, wait_timeout_ms)  # type: ignore[no-untyped-call]
    try:
        pipe.send()
    except REDIS_ERRORS as exc:
        raise BrokerError(f"cannot publish tasks to Redis: {exc}") from exc

    def answers() -> list[Enqueued]:
        try:
            replies = pipe.receive()
        except REDIS_ERRORS as exc:
            raise BrokerError(f"cannot publish tasks to Redis: {exc}") from exc
        if wait_replicas:
            acked = replies.pop()
            if acked < wait_replicas:  # written to the master only: a failover now could lose them
                raise BrokerError(
                    f"tasks reached {acked} of redis.wait_replicas={wait_replicas} replicas "
                    f"within {wait_timeout_ms} ms; not acknowledged, retried"
                )
        return [_ENQUEUED[x] for reply in replies for x in reply]

    return answers
