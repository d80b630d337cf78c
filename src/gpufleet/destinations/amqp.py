"""AMQP 0-9-1 destination (RabbitMQ): each record is published to an exchange, with publisher confirms.

URL: ``amqp://user:password@host:5672/vhost?exchange=results&routing_key=done`` (``amqps://`` for TLS; the vhost is
URL-encoded, ``%2F`` for ``/``, and an empty path is ``/``). Options:

- ``exchange`` (default: the default exchange, where ``routing_key`` is a queue name) and ``routing_key``;
- ``password_env``: the environment variable that holds the password, instead of writing it in the URL;
- ``timeout_s`` (10): connecting, and waiting for each confirm.

Each message is persistent (``delivery_mode`` 2), ``application/json``, its ``message_id`` the task id, and its
headers ``task_id``, ``condition`` and ``function``. It is published ``mandatory``: a record no queue is bound to
receive comes back and is parked (``NO_ROUTE``), as is every record of a batch when the exchange does not exist or
the user may not write to it. A lost connection, a timeout or a nack is retried with a new connection.

Read back (:class:`AmqpReader`) through a queue of the reader's own, bound to the exchange: new records only.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import Field, model_validator

from gpufleet.destinations.base import Landed, OutRecord, Refusal
from gpufleet.errors import ConfigError, DeliveryError
from gpufleet.urls import Endpoint, EnvName, Options, amqp_login

if TYPE_CHECKING:
    from gpufleet.settings import FleetSettings

PERMANENT_REPLY_CODES = frozenset({403, 404, 406})  # access refused, not found, precondition failed


class AmqpOptions(Options):
    exchange: str = ""
    routing_key: str = ""
    password_env: EnvName | None = None
    timeout_s: float = Field(10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _where_to(self) -> AmqpOptions:
        if not self.exchange and not self.routing_key:
            raise ValueError("name an exchange, or a routing_key (a queue, on the default exchange)")
        return self


class AmqpDestination:
    OPTIONS = AmqpOptions

    def __init__(self, endpoint: Endpoint, settings: FleetSettings) -> None:
        self.options = AmqpOptions.model_validate(endpoint.options)
        self._login = amqp_login(endpoint.url, self.options.password_env)
        parts = urlsplit(endpoint.url)
        self.where = (
            f"{parts.scheme}://{parts.hostname}/{self._login['virtual_host']} exchange {self.options.exchange!r}"
        )
        self._conn: Any = None
        self._channel: Any = None
        self._lock = threading.Lock()
        self._returned: list[tuple[int, str]] = []

    def _open(self) -> Any:
        import amqp

        if self._channel is None:
            timeout = self.options.timeout_s  # for every read and write too: closing a dead link must not hang
            conn = amqp.Connection(
                confirm_publish=True,
                connect_timeout=timeout,
                read_timeout=timeout,
                write_timeout=timeout,
                **self._login,
            )
            conn.connect()
            channel = conn.channel()
            channel.events["basic_return"].add(self._on_return)
            self._conn, self._channel = conn, channel
        return self._channel

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self._returned.append((int(message.properties.get("correlation_id", -1)), f"unroutable: {exc}"))

    def deliver(self, records: list[OutRecord]) -> list[Refusal]:
        import amqp
        from amqp.exceptions import AMQPError, MessageNacked

        with self._lock:
            self._returned = []
            try:
                channel = self._open()
                for i, r in enumerate(records):
                    message = amqp.Message(
                        r.value,
                        content_type="application/json",
                        delivery_mode=2,
                        message_id=r.key,
                        correlation_id=str(i),
                        application_headers={"task_id": r.key, **r.headers},
                    )
                    channel.basic_publish(
                        message,
                        exchange=self.options.exchange,
                        mandatory=True,
                        routing_key=self.options.routing_key,
                        confirm_timeout=self.options.timeout_s,
                    )
            except AMQPError as exc:
                self._reset()
                if getattr(exc, "reply_code", None) in PERMANENT_REPLY_CODES:  # no such exchange, not allowed
                    return [Refusal(i, f"{type(exc).__name__}: {exc}") for i in range(len(records))]
                raise DeliveryError(f"{self.where}: {type(exc).__name__}: {exc}") from exc
            except (OSError, MessageNacked) as exc:  # connection lost or refused, timeout, nack
                self._reset()
                raise DeliveryError(f"{self.where}: {type(exc).__name__}: {exc}") from exc
            return [Refusal(i, reason) for i, reason in self._returned]

    def _reset(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):  # drop the socket without a closing handshake: it may be gone
                conn.collect()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    self._conn.collect()
                self._conn = self._channel = None


class AmqpReader:
    """A queue of its own (server-named, exclusive, deleted when the reader goes), bound to the destination's exchange
    with its routing key: it receives a copy of each record published from then on, and the queues of the consumers
    downstream keep theirs. What was published before it started is in those queues only, so it has no history; a
    destination on the default exchange (a routing key that names a queue) cannot be copied, and is not read."""

    system = "RabbitMQ"
    history = False

    def __init__(self, endpoint: Endpoint, settings: FleetSettings) -> None:
        self._dest = AmqpDestination(endpoint, settings)
        self.where = self._dest.where
        self._conn: Any = None

    def follow(self, stop: threading.Event, from_beginning: bool, on_ready: Callable[[], None]) -> Iterator[Landed]:
        import amqp

        options = self._dest.options
        if not options.exchange:
            raise ConfigError(
                f"{self.where}: records go to queue {options.routing_key!r} on the default exchange, "
                "and reading a queue takes its messages from its consumers, so it is not read",
                fix="publish to an exchange (?exchange=...) that the queue is bound to",
            )
        got: list[Any] = []
        self._conn = conn = amqp.Connection(connect_timeout=options.timeout_s, **self._dest._login)
        try:
            conn.connect()
            channel = conn.channel()
            queue, _, _ = channel.queue_declare("", exclusive=True, auto_delete=True)
            channel.queue_bind(queue, options.exchange, routing_key=options.routing_key)
            channel.basic_consume(queue, no_ack=True, callback=got.append)
            on_ready()
            while not stop.is_set():
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    conn.heartbeat_tick()
                while got:
                    message = got.pop(0)
                    headers = {k: str(v) for k, v in (message.properties.get("application_headers") or {}).items()}
                    key = headers.pop("task_id", str(message.properties.get("message_id", "")))
                    tag = str(message.delivery_info.get("delivery_tag", ""))
                    yield Landed(self.where, tag, time.time(), key, headers, bytes(message.body))
        finally:
            self.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.collect()
