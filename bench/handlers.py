"""The work both sides of the benchmark run: identical bodies for gpufleet functions and raw Celery tasks.

Each handler writes one line to a Redis list, after its measured span, so the write is not part of what it times.
The duty-cycle spans are buffered in the process and written once per block (``flush``): a Redis round trip after each
20 ms task would cost both sides a cold round trip between two tasks (about 0.4 ms on a small VM), which caps any
system's measured duty near 0.98. The lists:

- ``bench:starts:<side>``: ``produced_ts,start_ts`` (end-to-end latency: produced to handler start);
- ``bench:spans:<side>``: ``start_ts,end_ts`` (worker duty cycle);
- ``bench:warm:<side>``: one entry per warm-up message or task, not measured.

The Redis URL comes from ``BENCH_REDIS_URL``; the client is made lazily, per process (after the pool's fork).
"""

from __future__ import annotations

import os
import time

import redis

_client: redis.Redis | None = None
_client_pid = 0


def client() -> redis.Redis:
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"], socket_timeout=10)
        _client_pid = os.getpid()
    return _client


def starts_key(side: str) -> str:
    return f"bench:starts:{side}"


def spans_key(side: str) -> str:
    return f"bench:spans:{side}"


def warm_key(side: str) -> str:
    return f"bench:warm:{side}"


def stamp(produced_ts: float, warm: bool = False, side: str = "", sent_ts: float | None = None) -> None:
    """Latency probe: records when the handler started, next to when the message was produced and (the naive
    bridge's) when it was sent to Celery."""
    started = time.time()
    if warm:
        client().rpush(warm_key(side), "1")
        return
    client().rpush(starts_key(side), f"{produced_ts!r},{started!r},{'' if sent_ts is None else repr(sent_ts)}")


_spans: list[str] = []


def spin(rounds: int) -> int:
    """Pure-Python work that holds the GIL: a fixed amount of it, so that whatever else runs in the process (a helper
    thread) makes it take longer."""
    x = 0
    for i in range(rounds):
        x += i * i
    return x


def rounds_per_ms() -> int:
    """How many rounds of :func:`spin` take 1 ms here (the bench measures this once, and both sides run as many)."""
    spin(100_000)  # warm
    best = float("inf")
    for _ in range(5):  # the fastest of five: a pass that lost the CPU meanwhile measures the machine, not the loop
        start = time.perf_counter()
        spin(200_000)
        best = min(best, time.perf_counter() - start)
    return int(200_000 / (best * 1000))


def work(ms: float = 20.0, warm: bool = False, side: str = "", flush: int = 1, span: bool = True,
         rounds: int = 0) -> None:  # fmt: skip
    """A fixed-length task: ``ms`` of wall time (a sleep, as a handler waiting on its GPU would; with ``rounds``,
    that much pure-Python work instead, which holds the GIL), then its span, written with the others once ``flush``
    spans are buffered (the size of the block this task belongs to). Without ``span``, nothing more: the batching
    figures come from the registry's records, and ``batchwork`` writes none."""
    start = time.time()
    if rounds:
        spin(rounds)
    deadline = time.perf_counter() + ms / 1000
    while not rounds and (left := deadline - time.perf_counter()) > 0:
        time.sleep(left)
    end = time.time()
    if not span:
        return
    if warm:
        client().rpush(warm_key(side), f"{start!r},{end!r}")
        return
    _spans.append(f"{start!r},{end!r}")
    if len(_spans) >= flush:
        client().rpush(spans_key(side), *_spans)
        _spans.clear()
