"""Reading AMQP frames so that no message can break the trigger.

py-amqp decodes a delivery's content header (its properties: headers table, timestamp, ...) inside
``Connection.drain_events``. A publisher controls those bytes, and some make the decoder raise there, out of the
consumer's reach: a timestamp past year 9999 (ValueError) or of 2^64-1 (OverflowError), a headers table nested
thousands of levels deep (RecursionError). The connection is then unusable, the message was never acknowledged, and
it comes back after every reconnect.

:func:`frame_handler` replaces py-amqp's own (``amqp.Connection(frame_handler=...)``, its documented seam): the same
frame state machine, whose messages (:class:`InboundMessage`) never raise on their content. A header that cannot be
decoded, or a body larger than the trigger takes, marks the message with a ``problem`` (a dead-letter reason and
detail) and it is delivered as any other, so the trigger dead-letters and acknowledges it. A body over the limit is
not kept as it arrives, only its first bytes: a prefetch window holds at most ``prefetch x limit`` bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from struct import unpack_from
from typing import Any

from amqp import spec
from amqp.basic_message import Message
from amqp.exceptions import UnexpectedFrame

Frame = tuple[int, int, Any]
METHOD, HEADER, BODY, HEARTBEAT = 1, 2, 3, 8
CONTENT_METHODS = frozenset({spec.Basic.Return, spec.Basic.Deliver, spec.Basic.GetOk})
KEPT_OF_TOO_LARGE = 4096  # bytes of an oversized body kept for its dead letter


class InboundMessage(Message):  # type: ignore[misc]  # py-amqp is untyped
    """A delivery whose content never raises: ``problem`` is ``(reason, detail)`` when it cannot be taken."""

    def __init__(self, limit: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limit = limit
        self.problem: tuple[str, str] | None = None
        self.chunks: list[bytes] = []
        self.kept = 0

    def inbound_header(self, buf: Any, offset: int = 0) -> int:
        class_id, self.body_size = unpack_from(">HxxQ", buf, offset)
        try:
            self._load_properties(class_id, buf, offset + 12)
        except Exception as exc:  # noqa: BLE001 - whatever the publisher wrote, this message only is refused
            self.properties: dict[str, Any] = {}
            self.problem = ("bad_amqp_properties", f"{type(exc).__name__}: {str(exc)[:300]}")
        if self.body_size > self.limit:
            self.problem = ("oversize", f"{self.body_size} bytes, more than the {self.limit} this trigger takes")
        if not self.body_size:
            self.body, self.ready = b"", True
        return offset + 12

    def inbound_body(self, buf: Any) -> None:
        self.body_received += len(buf)
        if self.body_size <= self.limit:
            self.chunks.append(bytes(buf))
        elif self.kept < KEPT_OF_TOO_LARGE:  # an oversized body: its first bytes, for the dead letter
            self.chunks.append(bytes(buf[: KEPT_OF_TOO_LARGE - self.kept]))
            self.kept += len(self.chunks[-1])
        if self.body_received >= self.body_size:
            self.body, self.chunks, self.ready = b"".join(self.chunks), [], True


def frame_handler(limit: int) -> Callable[[Any, Callable[..., Any]], Callable[[Frame], bool]]:
    """A py-amqp frame handler whose deliveries are :class:`InboundMessage` with this body limit (bytes)."""

    def make(connection: Any, callback: Callable[..., Any]) -> Callable[[Frame], bool]:
        expected: dict[int, int] = {}  # channel -> the frame type it waits for
        partial: dict[int, InboundMessage] = {}

        def on_frame(frame: Frame) -> bool:
            kind, channel, buf = frame
            connection.bytes_recv += 1
            if kind == HEARTBEAT:
                return False
            if kind != expected.get(channel, METHOD):
                raise UnexpectedFrame(f"Received frame {kind} while expecting type: {expected.get(channel, METHOD)}")
            if kind == METHOD:
                method = unpack_from(">HH", buf, 0)
                if method not in CONTENT_METHODS:
                    callback(channel, method, buf, None)
                    return True
                partial[channel] = InboundMessage(limit, frame_method=method, frame_args=buf)
                expected[channel] = HEADER
                return False
            msg = partial[channel]
            if kind == HEADER:
                msg.inbound_header(buf)
            else:
                msg.inbound_body(buf)
            if not msg.ready:
                expected[channel] = BODY
                return False
            expected[channel] = METHOD
            del partial[channel]
            callback(channel, msg.frame_method, msg.frame_args, msg)
            return True

        return on_frame

    return make
