"""The S3 event parser and filter, on the formats AWS, moto, MinIO, Ceph and SNS really send (no servers)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from gpufleet.aws import ObjectEvent
from gpufleet.errors import EventError
from gpufleet.triggers.s3events import EventFilter, Notification, parse_notification
from tests.s3samples import CEPH_ETAG, ceph_record, minio_log, minio_record

# AWS documentation sample (notification-content-structure).
AWS_DOC: dict[str, Any] = {
    "Records": [
        {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-west-2",
            "eventTime": "1970-01-01T00:00:00.000Z",
            "eventName": "ObjectCreated:Put",
            "userIdentity": {"principalId": "AIDAJDPLRKLG7UEXAMPLE"},
            "requestParameters": {"sourceIPAddress": "127.0.0.1"},
            "responseElements": {
                "x-amz-request-id": "C3D13FE58DE4C810",
                "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD",
            },
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "testConfigRule",
                "bucket": {
                    "name": "mybucket",
                    "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                    "arn": "arn:aws:s3:::mybucket",
                },
                "object": {
                    "key": "HappyFace.jpg",
                    "size": 1024,
                    "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                    "versionId": "096fKKXTRTtl3on89fVO.nfljtsv6qko",
                    "sequencer": "0055AED6DCD90281E5",
                },
            },
        }
    ]
}

# moto 5.2.5, exact bytes of a put_object of "in/a b+c ü€.txt" delivered to SQS.
MOTO = (
    b'{"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", '
    b'"eventTime": "2026-11-23T00:16:06.935Z", "eventName": "ObjectCreated:Put", "s3": {"s3SchemaVersion": "1.0", '
    b'"configurationId": "gpufleet", "bucket": {"name": "inbox", "arn": "arn:aws:s3:::inbox"}, "object": '
    b'{"key": "in%2Fa+b%2Bc+%C3%BC%E2%82%AC.txt", "size": 5, "eTag": "5d41402abc4b2a76b9719d911017c592"}}}]}'
)
MOTO_TEST_EVENT = (
    b'{"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-11-23T00:16:06.749Z", "Bucket": "inbox"}'
)
AWS_TEST_EVENT = {
    "Service": "Amazon S3",
    "Event": "s3:TestEvent",
    "Time": "2014-10-13T15:57:02.089Z",
    "Bucket": "bucketname",
    "RequestId": "5582815E1AEA5ADF",
    "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
}

# MinIO's docs sample (docs/bucket/notifications/README.md): the event.Log wrapper around one record.
MINIO: dict[str, Any] = minio_log(
    minio_record(
        "images",
        "myphoto.jpg",
        etag="430f89010c77aa34fc8760696da62d08-1",
        event_time="2019-09-10T17:41:54Z",
        endpoint="http://192.168.97.83:9000",
        deployment_id="751a8ba6-acb2-42f6-a297-4cdf1cf1fa4f",
        user_agent="Mozilla/5.0",
        versionId="1",
    )
)

# Ceph RGW's docs sample (doc/radosgw/notifications.rst): raw key, size as a string, versionId "", "eTag" spelled so.
CEPH: dict[str, Any] = {
    "Records": [
        ceph_record(
            "mybucket1",
            "myimage1.jpg",
            request_id2="14d2-zone1-zonegroup1",
            bucket_id="503a4c37-85eb-47cd-8681-2817e80b4281.5332.38",
            etag=None,
            eTag=CEPH_ETAG,
        )
    ]
}


def sns(message: Any, type_: str = "Notification", **extra: str) -> dict[str, Any]:
    """An SNS envelope as moto delivers it to SQS (§1.5), around ``message`` (JSON-encoded as SNS does)."""
    return {
        "Type": type_,
        "MessageId": "58d94a28-3f6e-4ad5-a5e1-3a6ba6d5bb1d",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:s3-events",
        "Message": message if isinstance(message, str) else json.dumps(message),
        "Timestamp": "2026-11-23T00:16:14.655Z",
        "SignatureVersion": "2",
        "Signature": "SbnX==",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-952757767f254da8917a81db74892652.pem",
        **extra,
    }


def record(
    key: str = "k.txt",
    name: str = "ObjectCreated:Put",
    source: str | None = "aws:s3",
    bucket: str = "inbox",
    **obj: Any,
) -> dict[str, Any]:
    """A minimal record; ``obj`` fields go into ``s3.object`` (``None`` removes one)."""
    fields: dict[str, Any] = {"key": key, "size": 5, "eTag": "5d41402abc4b2a76b9719d911017c592", **obj}
    rec: dict[str, Any] = {
        "eventVersion": "2.1",
        "eventTime": "2026-11-23T00:16:06.935Z",
        "eventName": name,
        "s3": {"bucket": {"name": bucket}, "object": {k: v for k, v in fields.items() if v is not None}},
    }
    if source is not None:
        rec["eventSource"] = source
    return rec


def records(*recs: dict[str, Any]) -> bytes:
    return json.dumps({"Records": list(recs)}).encode()


def one(body: Any, key_encoding: str = "auto") -> ObjectEvent:
    note = parse_notification(body, key_encoding)
    assert len(note.events) == 1 and not note.test_event
    return note.events[0]


# --- the real samples ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            AWS_DOC,
            ObjectEvent(
                bucket="mybucket",
                key="HappyFace.jpg",
                event_type="ObjectCreated:Put",
                size=1024,
                etag="d41d8cd98f00b204e9800998ecf8427e",
                version_id="096fKKXTRTtl3on89fVO.nfljtsv6qko",
                sequencer="0055AED6DCD90281E5",
                event_time="1970-01-01T00:00:00.000Z",
                source="aws:s3",
                region="us-west-2",
            ),
            id="aws-doc",
        ),
        pytest.param(
            MOTO,
            ObjectEvent(
                bucket="inbox",
                key="in/a b+c ü€.txt",
                event_type="ObjectCreated:Put",
                size=5,
                etag="5d41402abc4b2a76b9719d911017c592",
                event_time="2026-11-23T00:16:06.935Z",
                source="aws:s3",
                region="us-east-1",
            ),
            id="moto",
        ),
        pytest.param(
            MINIO,
            ObjectEvent(
                bucket="images",
                key="myphoto.jpg",
                event_type="ObjectCreated:Put",
                size=6474,
                etag="430f89010c77aa34fc8760696da62d08-1",
                version_id="1",
                sequencer="15C32494527B46C5",
                event_time="2019-09-10T17:41:54Z",
                content_type="image/jpeg",
                source="minio:s3",
                region=None,
            ),
            id="minio-wrapper",
        ),
        pytest.param(
            CEPH,
            ObjectEvent(
                bucket="mybucket1",
                key="myimage1.jpg",
                event_type="ObjectCreated:Put",
                size=1024,
                etag="37b51d194a7513e45b56f6524f2d51f2",
                version_id=None,
                sequencer="F7E6D75DC742D108",
                event_time="2019-11-22T13:47:35.124724Z",
                source="ceph:s3",
                region="zonegroup1",
            ),
            id="ceph",
        ),
    ],
)
def test_real_samples_decode(body: Any, expected: ObjectEvent) -> None:
    assert parse_notification(body) == Notification(events=[expected])


@pytest.mark.parametrize("form", ["bytes", "str", "mapping"])
def test_bytes_str_and_mapping_are_equivalent(form: str) -> None:
    body: Any = {"bytes": MOTO, "str": MOTO.decode(), "mapping": json.loads(MOTO)}[form]
    assert one(body).key == "in/a b+c ü€.txt"


# --- keys ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "key_encoding", "raw", "decoded"),
    [
        ("aws:s3", "auto", "a+b%2B1.json", "a b+1.json"),
        ("aws:s3", "auto", "in%2Fa+b%2Bc+%C3%BC%E2%82%AC.txt", "in/a b+c ü€.txt"),  # moto encodes "/" too
        ("aws:s3", "auto", "photos/red+flower.jpg", "photos/red flower.jpg"),  # real AWS keeps "/"
        ("minio:s3", "auto", "a%2Fb+c", "a/b c"),  # Go url.QueryEscape
        ("minio:s3", "auto", "%E6%97%A5%E6%9C%AC/%F0%9F%98%80.png", "日本/😀.png"),
        (None, "auto", "no%20source+here", "no source here"),  # eventSource absent: AWS rules
        ("ceph:s3", "auto", "a+b%2B1 ü.json", "a+b%2B1 ü.json"),  # Ceph sends the raw name
        ("ceph:s3", "auto", "100%.txt", "100%.txt"),
        ("ceph:s3", "url", "a+b%2B1.json", "a b+1.json"),  # a Ceph build or proxy that does encode
        ("aws:s3", "raw", "a+b%2B1.json", "a+b%2B1.json"),
        ("aws:s3", "auto", "100%25+sure%zz", "100% sure%zz"),  # a stray % that is no escape stays as it is
    ],
)
def test_key_decoding(source: str | None, key_encoding: str, raw: str, decoded: str) -> None:
    event = one(records(record(key=raw, source=source)), key_encoding)
    assert event.key == decoded
    assert event.source == (source or "aws:s3")


def test_unicode_key_sent_unescaped_is_kept() -> None:
    assert one(records(record(key="données/été.csv"))).key == "données/été.csv"


def test_unknown_key_encoding_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="key_encoding"):
        parse_notification(MOTO, "base64")


# --- message kinds -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [MOTO_TEST_EVENT, AWS_TEST_EVENT], ids=["moto", "aws-doc"])
def test_test_event_is_acknowledged_not_an_error(body: Any) -> None:
    assert parse_notification(body) == Notification(events=[], test_event=True)


def test_sns_notification_holding_records() -> None:
    envelope = sns(AWS_DOC, Subject="Amazon S3 Notification")
    note = parse_notification(json.dumps(envelope, indent=2))  # moto pretty-prints the SQS body
    assert note.sns_type == "Notification" and note.sns == envelope and not note.test_event
    assert note.events == parse_notification(AWS_DOC).events


def test_sns_notification_holding_moto_records_decodes_keys() -> None:
    assert one(sns(MOTO.decode())).key == "in/a b+c ü€.txt"


def test_sns_wrapped_test_event() -> None:
    note = parse_notification(json.dumps(sns(MOTO_TEST_EVENT.decode())))
    assert note.test_event and note.events == [] and note.sns_type == "Notification"


@pytest.mark.parametrize("type_", ["SubscriptionConfirmation", "UnsubscribeConfirmation"])
def test_sns_subscription_messages_carry_the_envelope(type_: str) -> None:
    envelope = sns(
        "You have chosen to subscribe to the topic arn:aws:sns:us-east-1:123456789012:s3-events.",
        type_,
        Token="2336412f37fb687f5d51e6e2425dacbbeef",
        SubscribeURL="https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=2336412f37fb687f5d51",
    )
    note = parse_notification(json.dumps(envelope).encode())
    assert note == Notification(events=[], sns_type=type_, sns=envelope)
    assert note.sns is not None and note.sns["SubscribeURL"].startswith("https://sns.")


def test_raw_message_delivery_is_bare_s3_json() -> None:
    note = parse_notification(json.dumps(AWS_DOC))
    assert note.sns_type is None and note.sns is None and len(note.events) == 1


def test_several_records_give_several_events_in_order() -> None:
    body = records(
        record(key="a.txt"),
        record(key="b%2Fc.txt", name="ObjectCreated:Copy"),
        record(key="d.txt", name="ObjectRemoved:Delete", eTag=None, size=None, sequencer="0055AED6DCD90281E6"),
    )
    events = parse_notification(body).events
    assert [(e.key, e.event_type) for e in events] == [
        ("a.txt", "ObjectCreated:Put"),
        ("b/c.txt", "ObjectCreated:Copy"),
        ("d.txt", "ObjectRemoved:Delete"),
    ]


def test_remove_event_has_a_sequencer_and_no_etag() -> None:
    event = one(records(record(name="ObjectRemoved:Delete", eTag=None, size=None, sequencer="0055AED6DCD90281E5")))
    assert event.event_type == "ObjectRemoved:Delete" and event.family == "ObjectRemoved"
    assert event.etag is None and event.size is None and event.sequencer == "0055AED6DCD90281E5"


def test_minio_event_name_loses_its_prefix_and_wrapper_is_ignored() -> None:
    body = copy.deepcopy(MINIO)
    body["Records"][0]["s3"]["object"]["key"] = "in%2Fa+b.jpg"
    body["Key"] = "images/in/a b.jpg"
    event = one(body)
    assert event.event_type == "ObjectCreated:Put" and event.key == "in/a b.jpg" and event.region is None


def test_minio_unversioned_record_without_version_id() -> None:
    event = one(records(record(source="minio:s3", name="s3:ObjectCreated:CompleteMultipartUpload", versionId="")))
    assert event.version_id is None and event.event_type == "ObjectCreated:CompleteMultipartUpload"


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"size": "1024"}, {"size": 1024}),
        ({"eTag": None, "etag": '"37b51d194a7513e45b56f6524f2d51f2"'}, {"etag": "37b51d194a7513e45b56f6524f2d51f2"}),
        ({"versionId": "", "sequencer": ""}, {"version_id": None, "sequencer": None}),
        ({"eTag": ""}, {"etag": None}),
        ({"size": "", "eTag": None}, {"size": None, "etag": None}),
    ],
)
def test_ceph_quirks(obj: dict[str, Any], expected: dict[str, Any]) -> None:
    event = one(records(record(source="ceph:s3", **obj)))
    assert {k: getattr(event, k) for k in expected} == expected


def test_old_ceph_event_name_with_prefix() -> None:
    assert one(records(record(source="ceph:s3", name="s3:ObjectCreated:Put"))).event_type == "ObjectCreated:Put"


def test_quoted_etag_is_unquoted() -> None:
    assert (
        one(records(record(eTag='"d41d8cd98f00b204e9800998ecf8427e-2"'))).etag == "d41d8cd98f00b204e9800998ecf8427e-2"
    )


def test_unknown_fields_and_newer_versions_are_accepted() -> None:
    rec = record()
    rec["eventVersion"] = "2.5"
    rec["glacierEventData"] = {"restoreEventData": {}}
    rec["s3"]["object"]["checksum"] = {"algorithm": "CRC64NVME"}
    assert one(records(rec)).key == "k.txt"


# --- identity: two events for one upload run once --------------------------------------------------------------------


def test_put_and_complete_multipart_upload_of_one_object_share_a_task_id() -> None:
    etag = "9dc2f6fb4e8d3c0e5a1b6c7d8e9f60d9-1"
    put, complete = parse_notification(
        records(
            record(key="in%2Fbig.bin", eTag=etag),
            record(key="in%2Fbig.bin", name="ObjectCreated:CompleteMultipartUpload", eTag=etag),
        )
    ).events
    assert put.event_type != complete.event_type
    assert put.task_id("f") == complete.task_id("f")


@pytest.mark.parametrize(
    "change",
    [
        {"eTag": "0cc175b9c0f1b6a831c399e269772661"},
        {"versionId": "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY"},
        {"name": "ObjectRemoved:Delete"},
        {"key": "other.bin"},
        {"bucket": "outbox"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_a_different_object_version_or_a_removal_gets_another_task_id(change: dict[str, str]) -> None:
    base = one(records(record(key="big.bin")))
    other = one(records(record(**{"key": "big.bin", **change})))
    assert base.task_id("f") != other.task_id("f")


def test_a_version_id_is_the_identity_when_there_is_one() -> None:
    first = one(records(record(versionId="v1", eTag="aaaa")))
    again = one(records(record(versionId="v1", eTag="aaaa", name="ObjectCreated:CompleteMultipartUpload")))
    assert first.task_id("f") == again.task_id("f")


# --- filter --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "prefix", "suffix", "event_type", "key", "wanted"),
    [
        (("ObjectCreated:*",), "", "", "ObjectCreated:Put", "a.txt", True),
        (("ObjectCreated:*",), "", "", "ObjectCreated:CompleteMultipartUpload", "a.txt", True),
        (("ObjectCreated:*",), "", "", "ObjectCreated:Copy", "a.txt", True),
        (("ObjectCreated:*",), "", "", "ObjectRemoved:Delete", "a.txt", False),
        (("s3:ObjectCreated:*",), "", "", "ObjectCreated:Post", "a.txt", True),
        (("s3:ObjectCreated:Put",), "", "", "ObjectCreated:Put", "a.txt", True),
        (("s3:ObjectCreated:Put",), "", "", "ObjectCreated:Copy", "a.txt", False),
        (("ObjectRemoved:*",), "", "", "ObjectRemoved:DeleteMarkerCreated", "a.txt", True),
        (("ObjectCreated:*", "ObjectRemoved:*"), "", "", "ObjectRemoved:Delete", "a.txt", True),
        (("objectcreated:*",), "", "", "ObjectCreated:Put", "a.txt", False),  # case-sensitive, as S3
        # MinIO's ObjectCreated:* includes metadata-only events: no new content, no task
        (("ObjectCreated:*",), "", "", "ObjectCreated:PutTagging", "a.txt", False),
        (("ObjectCreated:*",), "", "", "ObjectCreated:DeleteTagging", "a.txt", False),
        (("ObjectCreated:*",), "", "", "ObjectCreated:PutRetention", "a.txt", False),
        (("ObjectCreated:*",), "", "", "ObjectCreated:PutLegalHold", "a.txt", False),
        (("ObjectCreated:Put*",), "", "", "ObjectCreated:PutTagging", "a.txt", False),
        (("ObjectRemoved:*",), "", "", "ObjectRemoved:NoOP", "a.txt", False),
        (("s3:ObjectCreated:PutTagging",), "", "", "ObjectCreated:PutTagging", "a.txt", True),  # named: wanted
        (("ObjectCreated:*",), "in/", "", "ObjectCreated:Put", "in/a b.txt", True),
        (("ObjectCreated:*",), "in/", "", "ObjectCreated:Put", "out/in/a.txt", False),
        (("ObjectCreated:*",), "", ".txt", "ObjectCreated:Put", "in/a.TXT", False),
        (("ObjectCreated:*",), "in/", ".txt", "ObjectCreated:Put", "in/a b+c ü€.txt", True),
        (("ObjectCreated:*",), "in/", ".txt", "ObjectCreated:Put", "in/no.bin", False),
    ],
)
def test_event_filter(
    events: tuple[str, ...], prefix: str, suffix: str, event_type: str, key: str, wanted: bool
) -> None:
    event = ObjectEvent(bucket="inbox", key=key, event_type=event_type)
    assert EventFilter(events, prefix, suffix).matches(event) is wanted


def test_event_filter_defaults_and_decoded_keys() -> None:
    wanted = EventFilter(prefix="in/", suffix=".txt")
    assert wanted.matches(one(MOTO))  # the prefix is matched against "in/a b+c ü€.txt", not "in%2F..."
    assert "ObjectCreated:*" in repr(wanted)


def test_event_filter_takes_a_single_pattern_string() -> None:
    assert EventFilter("ObjectRemoved:Delete").events == ("ObjectRemoved:Delete",)


@pytest.mark.parametrize("events", [(), ("",), ("ObjectCreated",), ("ObjectCreated:* ",), ("s3:",)])
def test_event_filter_rejects_bad_patterns(events: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="pattern"):
        EventFilter(events)


# --- malformed input -----------------------------------------------------------------------------------------------


def _mutated(change: Any) -> bytes:
    rec = record()
    change(rec)
    return records(rec)


@pytest.mark.parametrize(
    ("body", "reason", "detail"),
    [
        (b"{not json", "malformed_json", "not JSON"),
        (b'{"Records": [], "x": "\xff"}', "malformed_json", "not JSON"),  # not UTF-8
        (b"", "malformed_json", "not JSON"),
        (json.dumps(sns("{nope")), "malformed_json", "SNS Message is not JSON"),
        (b"[1, 2]", "not_s3_event", "an array"),
        (b'"Records"', "not_s3_event", "a string"),
        (b'{"function": "embed", "payload": {}}', "not_s3_event", "function, payload"),
        (b'{"Records": {}}', "not_s3_event", "not an array"),
        (b'{"Records": []}', "not_s3_event", "empty"),
        (b'{"Service": "Amazon S3", "Event": "s3:Other"}', "not_s3_event", "Event, Service"),
        (b'{"Type": "Notification", "Message": "{}"}', "not_s3_event", "Message, Type"),  # no TopicArn
        (json.dumps({**sns(""), "Message": None}), "not_s3_event", "Message is missing"),
        (json.dumps(sns({"hello": 1})), "not_s3_event", "SNS Message: an object with keys [hello]"),
        (json.dumps(sns(sns(AWS_DOC))), "not_s3_event", "SNS Message"),  # SNS inside SNS is not S3
        (records(record(), "oops"), "bad_record", "record 1: is a string"),  # type: ignore[arg-type]
        (_mutated(lambda r: r.pop("eventName")), "bad_record", "record 0: eventName is missing"),
        (_mutated(lambda r: r.update(eventName="s3:")), "bad_record", "eventName is missing or empty"),
        (_mutated(lambda r: r.update(eventName=7)), "bad_record", "eventName is a number"),
        (_mutated(lambda r: r.update(eventVersion="1.0")), "bad_record", "eventVersion '1.0' is not 2.x"),
        (_mutated(lambda r: r.update(eventVersion=2.1)), "bad_record", "eventVersion is a number"),
        (_mutated(lambda r: r.pop("s3")), "bad_record", "s3 is missing"),
        (_mutated(lambda r: r["s3"].pop("bucket")), "bad_record", "s3.bucket.name is missing"),
        (_mutated(lambda r: r["s3"]["bucket"].update(name="")), "bad_record", "s3.bucket.name is missing"),
        (_mutated(lambda r: r["s3"].pop("object")), "bad_record", "s3.object is missing"),
        (_mutated(lambda r: r["s3"]["object"].pop("key")), "bad_record", "s3.object.key is missing"),
        (_mutated(lambda r: r["s3"]["object"].update(key=["a"])), "bad_record", "s3.object.key is an array"),
        (_mutated(lambda r: r["s3"]["object"].update(key="%FF%FE.txt")), "bad_record", "not percent-encoded UTF-8"),
        (_mutated(lambda r: r["s3"]["object"].update(size=-1)), "bad_record", "s3.object.size -1"),
        (_mutated(lambda r: r["s3"]["object"].update(size="12kB")), "bad_record", "s3.object.size '12kB'"),
        (_mutated(lambda r: r["s3"]["object"].update(size=True)), "bad_record", "s3.object.size True"),
        (_mutated(lambda r: r["s3"]["object"].update(eTag=5)), "bad_record", "s3.object.eTag is a number"),
        (_mutated(lambda r: r.update(awsRegion={})), "bad_record", "awsRegion is an object"),
        (json.dumps(sns({"Records": [{"eventName": "ObjectCreated:Put"}]})), "bad_record", "SNS Message: record 0"),
    ],
)
def test_malformed_input_has_a_stable_reason(body: bytes | str, reason: str, detail: str) -> None:
    with pytest.raises(EventError) as err:
        parse_notification(body)
    assert err.value.reason == reason
    assert detail in err.value.detail


def test_one_bad_record_dead_letters_the_whole_message() -> None:
    with pytest.raises(EventError, match=r"bad_record: record 2: s3\.object\.key"):
        parse_notification(records(record(key="a"), record(key="b"), record(key="")))


def test_raw_encoding_never_fails_on_a_key() -> None:
    rec = record(key="%FF%FE.txt", source="ceph:s3")
    assert one(records(rec)).key == "%FF%FE.txt"
