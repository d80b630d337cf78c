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


@st.composite
def envelopes(draw: st.DrawFn) -> bytes:
    body: dict[str, Any] = {"function": draw(FUNCTIONS), "payload": draw(st.one_of(VALUES, DEEP.map(json.loads)))}
    if draw(st.booleans()):
        body["id"] = draw(IDS)
    if draw(st.booleans()):
        del body[draw(st.sampled_from(["function", "payload"]))]
    return dumps(body)


#: Bodies for a JSON trigger that routes by the message's "function" field.
JSON_MESSAGES = st.one_of(envelopes(), DEEP, RAW, VALUES.map(dumps))

FIELD_VALUES = st.one_of(VALUES, st.text(min_size=1000, max_size=1100), st.sampled_from(["x" * 5000, "9" * 5000]))


@st.composite
def s3_records(draw: st.DrawFn, bucket: str = "fuzz") -> dict[str, Any]:
    key = draw(
        st.one_of(st.text(min_size=1, max_size=60), st.sampled_from(["a%ZZb", "%C0%AF", "x" * 1100, "../../etc"]))
    )
    record = draw(st.sampled_from([minio_record, ceph_record]))(bucket, key)
    # Replace or drop a few fields anywhere in the record: the size, the key, the name, a whole section.
    for path in draw(st.lists(st.sampled_from(SPOTS), max_size=3)):
        parent = record
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            if draw(st.booleans()):
                parent[path[-1]] = draw(st.one_of(FIELD_VALUES, st.sampled_from(["99999999999999999999", "9" * 5000])))
            else:
                parent.pop(path[-1], None)
    return record


SPOTS = [("s3", "object", "size"), ("s3", "object", "key"), ("eventName",), ("s3", "bucket", "name"),
         ("s3", "object", "eTag"), ("eventVersion",), ("s3",), ("s3", "object"), ("eventSource",),
         ("s3", "object", "versionId"), ("eventTime",)]  # fmt: skip


@st.composite
def notifications(draw: st.DrawFn) -> bytes:
    records = draw(st.lists(s3_records(), min_size=0, max_size=3))
    if draw(st.integers(0, 20)) == 0:
        records = [minio_record("fuzz", "flood.jpg")] * 150  # a flood: more records than any server sends
    shape = draw(st.sampled_from(["aws", "minio", "sns", "test", "raw"]))
    if shape == "minio":
        # MinIO's wrapper repeats the first record's event name and key at the top level.
        return dumps({"EventName": "s3:ObjectCreated:Put", "Key": "fuzz/k", "Records": records})
    if shape == "sns":
        inner = draw(st.one_of(st.just(dumps({"Records": records}).decode()), st.text(max_size=50), VALUES))
        return dumps({"Type": "Notification", "TopicArn": "arn:aws:sns:us-east-1:1:t", "MessageId": "m",
                      "Message": inner})  # fmt: skip
    if shape == "test":
        return dumps({"Event": "s3:TestEvent", "Bucket": draw(st.text(max_size=10))})
    if shape == "raw":
        return draw(st.one_of(RAW, DEEP, VALUES.map(dumps)))
    return dumps({"Records": records})
