"""The API's HTTP/1.1 connections: uvicorn's h11 protocol, plus what it lacks against slow clients.

uvicorn waits for a request's headers for ever, and its ``limit_concurrency`` counts open connections: 200
connections that each sent half a request head made every request, ``/healthz`` and authorized ones included,
answer 503 for as long as they were held. Here instead:

- a request head (request line and headers) must arrive whole within ``api.header_timeout_s`` of the connection
  opening, or of the previous response on a kept-alive connection; else 408 and the connection is closed;
- one client address holds at most ``api.max_connections_per_client`` connections; the next is answered 503 and
  closed at once;
- ``api.max_connections`` bounds the requests being served (:class:`RequestLimit`), not the connections: a
  connection still sending its head costs a socket and at most h11's 16 KiB buffer, never a request's place.

Compared first, with their defaults and the same probe (300 connections from one address, each sending half a
request head, then nothing or a byte every 2 s): hypercorn 0.18.0 and granian 2.8.9 both kept answering others at
once, and closed the slow connections without an answer, hypercorn after 5 s (its keep-alive timer runs until a
whole head is read), granian after 30 s (``--http1-header-read-timeout``). Neither caps connections per address.
uvicorn stays, with the two things it lacks added here: a timeout on the head, and a cap per address.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import h11
import orjson
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gpufleet.api.errors import CLOSE, error_response


def _answer(status: int, reason: str, code: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\nretry-after: 1\r\n\r\n"
    ).encode() + body


HEAD_TIMEOUT = _answer(408, "Request Timeout", "header_timeout", "the request head did not arrive in time")
TOO_MANY = _answer(503, "Service Unavailable", "too_many_connections", "too many connections from this address")


def guarded_protocol(header_timeout_s: float, max_per_client: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header timeout and a cap per client address (``uvicorn.Config(http=...)``)."""
    held: Counter[str] = Counter()  # connections per client address, for this server

    class GuardedH11Protocol(H11Protocol):
        _peer: str | None = None
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = self.client[0] if self.client else None
            if peer is not None and held[peer] >= max_per_client:
                transport.write(TOO_MANY)
                transport.close()
                return
            if peer is not None:
                self._peer = peer
                held[peer] += 1
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            if self._peer is not None:
                held[self._peer] -= 1
                if not held[self._peer]:
                    del held[self._peer]
                self._peer = None
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._await_head()  # the next request on this connection

        def _await_head(self) -> None:
            self._stop_head_timer()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_overdue)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_overdue(self) -> None:
            self._head_timer = None
            # IDLE: no whole request head since the timer was armed (a request that has one is served, and its
            # body has api.body_timeout_s of its own).
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(HEAD_TIMEOUT)
                self.transport.close()

    return GuardedH11Protocol


class RequestLimit:
    """At most ``limit`` requests served at once; more are answered 503 ``unavailable`` at once, with
    ``Retry-After``."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            busy = error_response(
                503,
                "unavailable",
                "too many requests at once (api.max_connections); try again",
                headers={"Retry-After": "1", **CLOSE},
            )
            await busy(scope, receive, send)
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
