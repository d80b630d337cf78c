"""Parked records: callback records and dead letters that a destination refused for good.

A record a destination will never accept as it is (too large for it, a topic it may not write) must not hold up the
records behind it, nor be dropped. It is parked: moved, with the reason, from the callback stream (or the trigger's
dead-letter path) to the stream ``<prefix>:parked``, in one transaction. An operator lists parked records
(``gpufleet parked``, ``GET /v1/parked``), fixes the cause, and re-sends them (they go back to the callback stream,
and are parked again if still refused) or drops them.

An entry holds ``dest``, ``key``, ``value``, ``headers`` (JSON), ``reason`` and ``parked_at`` (see
:func:`gpufleet.registry.keyspace.stream_entry`). It keeps the URL as
configured, to re-send to; a listing shows it, and the reason, with their secrets masked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis

from gpufleet.credentials import redact, redact_url
from gpufleet.destinations.base import OutRecord
from gpufleet.registry.keyspace import PARKED_FIELDS, Keyspace, parked_fields, stream_entry

PARKED_ID = r"\d{1,19}-\d{1,19}"  # a stream entry id: two 64-bit numbers, and 19 digits always fit


class Parking:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        keys = Keyspace(prefix)
        self.key = keys.parked
        self.callbacks = keys.callbacks

    def park(self, pipe: Any, dest: str, record: OutRecord, reason: str) -> None:
        """Add a parked entry on ``pipe`` (a pipeline the caller executes, with the removal from where it was)."""
        pipe.xadd(self.key, parked_fields(dest, record.key, record.value, record.headers, reason))

    def park_now(self, dest: str, records: Iterable[tuple[OutRecord, str]]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for record, reason in records:
            self.park(pipe, dest, record, reason)
        pipe.execute()

    def count(self) -> int:
        return int(self.client.xlen(self.key))

    def entries(self, limit: int = 100, after: str | None = None) -> list[dict[str, Any]]:
        """Oldest first; pass the last ``id`` as ``after`` for the next page. Values are shown as text, cut to
        1,000 characters."""
        start = f"({after}" if after else "-"
        rows: list[tuple[bytes, dict[bytes, bytes]]] = self.client.xrange(self.key, start, "+", count=limit)  # type: ignore[assignment]
        out = []
        for entry_id, f in rows:
            entry = stream_entry(f)
            out.append(
                {
                    "id": entry_id.decode(),
                    "destination": redact_url(entry.dest),
                    "key": entry.key,
                    "reason": redact(entry.reason),
                    "parked_at": entry.parked_at,
                    "bytes": len(entry.value),
                    "headers": entry.headers or {},
                    "value": entry.value[:1000].decode(errors="replace"),
                }
            )
        return out

    def resend(self, ids: list[str] | None = None) -> int:
        """Move parked entries (all of them with None) back to the callback stream; returns how many."""
        moved = 0
        for entry_id, fields in self._entries(ids):
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(self.callbacks, {k: fields.get(k.encode(), b"") for k in PARKED_FIELDS})
            pipe.xdel(self.key, entry_id)
            pipe.execute()
            moved += 1
        return moved

    def drop(self, ids: list[str]) -> int:
        return int(self.client.xdel(self.key, *ids)) if ids else 0

    def _entries(self, ids: list[str] | None) -> Iterable[tuple[bytes, dict[bytes, bytes]]]:
        rows: Any  # redis-py types stream replies loosely: [(id, {field: value})]
        if ids is None:
            # Up to the last one parked now: what is re-sent and refused again parks anew, after it.
            last: Any = self.client.xrevrange(self.key, "+", "-", count=1)
            if not last:
                return
            start, end = "-", last[0][0].decode()
            while True:
                rows = self.client.xrange(self.key, start, end, count=500)
                if not rows:
                    return
                yield from rows
                start = f"({rows[-1][0].decode()}"
        for entry_id in ids:
            rows = self.client.xrange(self.key, entry_id, entry_id)
            yield from rows
