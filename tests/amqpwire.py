"""Publishing AMQP messages at the wire level: content headers of any bytes, which no client library would write
(a timestamp past year 9999, a headers table nested 5,000 deep, a property list that is not one).

:class:`RawPublisher` writes the three frames of a ``basic.publish`` itself on a py-amqp connection, and waits for the
broker's confirm. RabbitMQ may refuse a message (it closes the channel or the connection): ``publish`` then returns
False and the next one opens them again.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import strategies as st

# Basic's property flags, highest bit first (AMQP 0-9-1, 4.2.6.1), and the type of each value.
PROPERTIES = [("content_type", "s"), ("content_encoding", "s"), ("headers", "F"), ("delivery_mode", "o"),
              ("priority", "o"), ("correlation_id", "s"), ("reply_to", "s"), ("expiration", "s"),
              ("message_id", "s"), ("timestamp", "T"), ("type", "s"), ("user_id", "s"), ("app_id", "s"),
              ("cluster_id", "s")]  # fmt: skip
FRAME_END = b"\xce"


def shortstr(raw: bytes) -> bytes:
    return struct.pack(">B", len(raw)) + raw


def longstr(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def table(fields: list[tuple[bytes, bytes]]) -> bytes:
    """A field table from (name, type char + encoded value) pairs."""
    return longstr(b"".join(shortstr(name) + value for name, value in fields))


def nested_array(depth: int) -> bytes:
    value = b"I" + struct.pack(">i", 1)
    for _ in range(depth):
        value = b"A" + longstr(value)
    return value


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + FRAME_END


def publish_frames(channel: int, queue: str, properties: bytes, flags: int, body: bytes, frame_max: int) -> bytes:
    """basic.publish to the default exchange, then the content header with these raw properties, then the body."""
    method = struct.pack(">HHH", 60, 40, 0) + shortstr(b"") + shortstr(queue.encode()) + b"\x00"
    header = struct.pack(">HHQH", 60, 0, len(body), flags) + properties
    chunk = frame_max - 8
    bodies = b"".join(frame(3, channel, body[i : i + chunk]) for i in range(0, len(body), chunk))
    return frame(1, channel, method) + frame(2, channel, header) + bodies


class RawPublisher:
    def __init__(self, host: str) -> None:
        self.host = host
        self.conn: Any = None
        self.channel: Any = None
        self.refused = 0

    def _open(self) -> None:
        import amqp

        if self.conn is None or not self.conn.connected:
            self.conn = amqp.Connection(self.host, userid="guest", password="guest", connect_timeout=5)
            self.conn.connect()
            self.channel = None
        if self.channel is None or not self.channel.is_open:
            self.channel = self.conn.channel()
            self.channel.confirm_select()

    def publish(self, queue: str, properties: bytes, flags: int, body: bytes) -> bool:
        """True when the broker confirmed the message (it is in the queue)."""
        from amqp import spec

        self._open()
        data = publish_frames(self.channel.channel_id, queue, properties, flags, body, self.conn.frame_max)
        try:
            self.conn.transport.write(data)
            self.channel.wait([spec.Basic.Ack, spec.Basic.Nack], timeout=10)
            return True
        except Exception:  # noqa: BLE001 - the broker refused it: channel or connection closed
            self.refused += 1
            self.channel = None
            if self.conn is not None and not self.conn.connected:
                self.conn = None
            return False

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001
                self.conn.collect()


# -- hypothesis: property lists of any value ------------------------------------------------------------------------

U64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([2**64 - 1, 253402300800, 2**63, 0, 10**15]))
NAMES = st.one_of(st.binary(max_size=12), st.sampled_from([b"gpufleet-id", b"traceparent", b"x-priority", b"CC"]))


def scalar_values() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(lambda v: b"T" + struct.pack(">Q", v), U64),
        st.builds(lambda s, v: b"D" + struct.pack(">Bi", s, v), st.integers(0, 255), st.integers(-(2**31), 2**31 - 1)),
        st.builds(lambda raw: b"S" + longstr(raw), st.binary(max_size=40)),  # not always UTF-8
        st.builds(lambda v: b"l" + struct.pack(">q", v), st.integers(-(2**63), 2**63 - 1)),
        st.builds(lambda v: b"d" + struct.pack(">d", v), st.floats(allow_nan=True)),
        st.builds(lambda v: b"t" + struct.pack(">B", v), st.integers(0, 255)),
        st.just(b"V"),
        st.builds(lambda c, raw: c + raw, st.sampled_from([b"?", b"Z", b"\x00"]), st.binary(max_size=8)),  # no type
        st.builds(nested_array, st.sampled_from([5, 200, 990, 5000])),
    )


FIELD_VALUES = st.recursive(
    scalar_values(),
    lambda inner: st.one_of(
        st.builds(lambda vs: b"A" + longstr(b"".join(vs)), st.lists(inner, max_size=3)),
        st.builds(lambda fs: b"F" + table(fs), st.lists(st.tuples(NAMES, inner), max_size=3)),
    ),
    max_leaves=6,
)
ENCODERS = {
    "s": st.binary(max_size=40).map(shortstr),
    "o": st.integers(0, 255).map(lambda v: struct.pack(">B", v)),
    "T": U64.map(lambda v: struct.pack(">Q", v)),
    "F": st.lists(st.tuples(NAMES, FIELD_VALUES), max_size=4).map(table),
}
# RabbitMQ checks these itself (user-id against the login, expiration as a TTL): left out, or every message would be
# the broker's to refuse.
FUZZED = [i for i, (name, _) in enumerate(PROPERTIES) if name not in ("user_id", "expiration")]


CHOSEN = st.sets(st.sampled_from(FUZZED), max_size=5)  # built once: hypothesis validates each new strategy
ANY_BYTES = st.binary(max_size=64)


@st.composite
def content_headers(draw: st.DrawFn) -> tuple[bytes, int]:
    """(property list, property flags): well-formed values of any content, or (sometimes) any bytes at all."""
    chosen = sorted(draw(CHOSEN))
    flags = sum(1 << (15 - i) for i in chosen)
    if draw(st.booleans()) and draw(st.booleans()) and draw(st.booleans()):  # 1 in 8
        return draw(ANY_BYTES), flags
    return b"".join(draw(ENCODERS[PROPERTIES[i][1]]) for i in chosen), flags
