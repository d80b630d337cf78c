"""The work both sides of the benchmark run: identical bodies for gpufleet functions and raw Celery tasks.

Each handler writes one line to a Redis list, after its measured span, so the write is not part of what it times:

- ``bench:starts``: ``produced_ts,start_ts`` (end-to-end latency: produced to handler start);
- ``bench:spans``: ``start_ts,end_ts`` (worker duty cycle);
- ``bench:warm``: one entry per warm-up message, which the harness waits for and then discards.

The Redis URL comes from ``BENCH_REDIS_URL``; the client is made lazily, per process (after the pool's fork).
"""

from __future__ import annotations

import os
import time

import redis

STARTS_KEY = "bench:starts"
SPANS_KEY = "bench:spans"
WARM_KEY = "bench:warm"

_client: redis.Redis | None = None
_client_pid = 0


def client() -> redis.Redis:
    global _client, _client_pid  # noqa: PLW0603 - one connection per process, made after fork
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"], socket_timeout=10)
        _client_pid = os.getpid()
    return _client


def stamp(produced_ts: float, warm: bool = False) -> None:
    """Latency probe: records when the handler started, next to when the message was produced."""
    started = time.time()
    if warm:
        client().rpush(WARM_KEY, "1")
        return
    client().rpush(STARTS_KEY, f"{produced_ts!r},{started!r}")


def work(ms: float = 20.0, warm: bool = False) -> None:
    """A fixed-length task: ``ms`` of wall time (a sleep, as a handler waiting on its GPU would), then its span."""
    start = time.time()
    deadline = time.perf_counter() + ms / 1000
    while (left := deadline - time.perf_counter()) > 0:
        time.sleep(left)
    end = time.time()
    client().rpush(WARM_KEY if warm else SPANS_KEY, f"{start!r},{end!r}")
