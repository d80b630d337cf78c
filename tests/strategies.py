"""Hypothesis strategies for hostile intake: JSON events, routing envelopes and S3 notifications, each mixing what
real producers send with what breaks parsers (deep nesting, huge integers, NaN, odd types, long keys, floods)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from tests.s3samples import ceph_record, minio_record

# Integers at and beyond 64 bits, and digit strings longer than int() accepts.
BIG_INTS = st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**20, -(10**30), 10**400])
NUMBERS = st.one_of(st.integers(), BIG_INTS, st.floats(allow_nan=True, allow_infinity=True))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=40))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12,
)
FUNCTIONS = st.sampled_from(["echo", "typed", "always_fail", "no_such_fn", "", "ECHO", "echo\n"])
IDS = st.one_of(
    st.none(),
    st.text(max_size=30),
    st.sampled_from(["ok-1", "ends-in-newline\n", "x" * 201, "a/b", " lead", "kafka-x-0-1", "api-squat"]),
    st.integers(),
    BIG_INTS,
    VALUES,
)


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"n": value}
    return value


def dumps(value: Any) -> bytes:
    """Like a producer in any language: NaN and Infinity spelt out, integers of any size."""
    return json.dumps(value, allow_nan=True).encode()


DEEP = st.integers(min_value=60, max_value=1100).map(lambda d: dumps(nested(d)))
RAW = st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode))


PAYLOADS = st.one_of(VALUES, DEEP.map(json.loads))
ENVELOPE_FIELDS = st.sampled_from(["function", "payload"])


@st.composite
def envelopes(draw: st.DrawFn) -> bytes:
    body: dict[str, Any] = {"function": draw(FUNCTIONS), "payload": draw(PAYLOADS)}
    if draw(st.booleans()):
        body["id"] = draw(IDS)
    if draw(st.booleans()):
        del body[draw(ENVELOPE_FIELDS)]
    return dumps(body)


#: Bodies for a JSON trigger that routes by the message's "function" field.
JSON_MESSAGES = st.one_of(envelopes(), DEEP, RAW, VALUES.map(dumps))

# Over a kilobyte, from a short drawn run repeated: hypothesis draws a string one character at a time, and 1,000 drawn
# characters cost as much as the rest of a notification.
LONG_TEXT = st.builds(lambda run, n: (run * n)[:n], st.text(min_size=1, max_size=8), st.integers(1000, 1100))
FIELD_VALUES = st.one_of(VALUES, LONG_TEXT, st.sampled_from(["x" * 5000, "9" * 5000]))


# Strategies are built once, here, not inside the composites: hypothesis validates each new strategy object at its
# first draw, which cost as much as the drawing.
KEYS = st.one_of(st.text(min_size=1, max_size=60), st.sampled_from(["a%ZZb", "%C0%AF", "x" * 1100, "../../etc"]))
RECORD_MAKERS = st.sampled_from([minio_record, ceph_record])
SPOTS = [("s3", "object", "size"), ("s3", "object", "key"), ("eventName",), ("s3", "bucket", "name"),
         ("s3", "object", "eTag"), ("eventVersion",), ("s3",), ("s3", "object"), ("eventSource",),
         ("s3", "object", "versionId"), ("eventTime",)]  # fmt: skip
SPOT_LISTS = st.lists(st.sampled_from(SPOTS), max_size=3)
SPOT_VALUES = st.one_of(FIELD_VALUES, st.sampled_from(["99999999999999999999", "9" * 5000]))


@st.composite
def s3_records(draw: st.DrawFn, bucket: str = "fuzz") -> dict[str, Any]:
    record: dict[str, Any] = draw(RECORD_MAKERS)(bucket, draw(KEYS))
    # Replace or drop a few fields anywhere in the record: the size, the key, the name, a whole section.
    for path in draw(SPOT_LISTS):
        parent = record
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            if draw(st.booleans()):
                parent[path[-1]] = draw(SPOT_VALUES)
            else:
                parent.pop(path[-1], None)
    return record


RECORD_LISTS = st.lists(s3_records(), min_size=0, max_size=3)
SHAPES = st.sampled_from(["aws", "minio", "sns", "test", "raw"])
THE_RECORDS = object()  # SNS's Message: the records, as JSON text
SNS_MESSAGES = st.one_of(st.just(THE_RECORDS), st.text(max_size=50), VALUES)
RAW_BODIES = st.one_of(RAW, DEEP, VALUES.map(dumps))


@st.composite
def notifications(draw: st.DrawFn) -> bytes:
    shape = draw(SHAPES)
    if shape == "test":
        return dumps({"Event": "s3:TestEvent", "Bucket": draw(st.text(max_size=10))})
    if shape == "raw":
        return draw(RAW_BODIES)
    records = draw(RECORD_LISTS)
    if draw(st.integers(0, 20)) == 0:
        records = [minio_record("fuzz", "flood.jpg")] * 150  # a flood: more records than any server sends
    if shape == "minio":
        # MinIO's wrapper repeats the first record's event name and key at the top level.
        return dumps({"EventName": "s3:ObjectCreated:Put", "Key": "fuzz/k", "Records": records})
    if shape == "sns":
        inner = draw(SNS_MESSAGES)
        inner = dumps({"Records": records}).decode() if inner is THE_RECORDS else inner
        return dumps({"Type": "Notification", "TopicArn": "arn:aws:sns:us-east-1:1:t", "MessageId": "m",
                      "Message": inner})  # fmt: skip
    return dumps({"Records": records})
