"""Real S3, MinIO, Ceph, SNS and SQS notifications from public repositories (``tests/data/s3-vectors``, where each
came from is in its MANIFEST.md), fed to the parser as a trigger receives them: each gives its events, or is
refused with a reason, never an unexpected error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from gpufleet.errors import EventError
from gpufleet.triggers.s3events import Notification, parse_notification

VECTORS = Path(__file__).parents[1] / "data" / "s3-vectors"


def load(name: str) -> Any:
    return orjson.loads((VECTORS / name).read_bytes())


def events(body: bytes | str | dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(e.event_type, e.bucket, e.key) for e in parse_notification(body).events]


def refused(body: bytes | str | dict[str, Any]) -> str:
    with pytest.raises(EventError) as err:
        parse_notification(body)
    return err.value.reason


# -- every file, as it is ------------------------------------------------------------------------------------------

ACCEPTED = {
    "awsdocs__s3_put_example.json": ("ObjectCreated:Put", "mybucket", "HappyFace.jpg"),
    "awslambdago__s3-event.json": ("ObjectCreated:Put", "sourcebucket", "Happy Face.jpg"),
    "awslambdago__s3-event-with-decoded.json": ("ObjectCreated:Put", "sourcebucket", "Happy Face.jpg"),
    "awslambdago__s3-glacier-event.json": ("ObjectRestore:Completed", "example-bucket", "glacier-test.txt"),
    "awslambdago__s3-intelligenttier-event.json": (
        "IntelligentTiering:TransitionAccess",
        "example-bucket",
        "intelligent-tier-test.dat",
    ),
    "awslambdago__s3-lifecycle-event.json": ("LifecycleTransition", "example-bucket", "lifecycle-test.dat"),
    "awslambdago__s3-replication-event.json": (
        "Replication:OperationFailedReplication",
        "amzn-s3-demo-bucket1",
        "replication-test.png",
    ),
    "awslambdago__s3-restore-event.json": ("ObjectRestore:Completed", "example-bucket", "glacier-test.txt"),
    "java__s3_event.json": ("ObjectCreated:Put", "sourcebucket", "HappyFace.jpg"),
    "powertools__s3Event.json": (
        "ObjectCreated:Put",
        "lambda-artifacts-deafc19498e3f2df",
        "b21b84d653bb07b05b1e6b33684dc11b",
    ),
    "powertools__s3EventDeleteObject.json": (
        "ObjectRemoved:Delete",
        "lambda-artifacts-deafc19498e3f2df",
        "b21b84d653bb07b05b1e6b33684dc11b",
    ),
    "powertools__s3EventGlacier.json": (
        "ObjectCreated:Put",
        "lambda-artifacts-deafc19498e3f2df",
        "b21b84d653bb07b05b1e6b33684dc11b",
    ),
    "minio_blog__webhook_put_plus_key.json": ("ObjectCreated:Put", "vd-main", "Tile_+002_+002.mtl"),
    "minio_blog__webhook_delete_plus_key.json": ("ObjectRemoved:Delete", "vd-main", "Tile_+002_+002.mtl"),
    "minio_docs__amqp_2016.json": ("ObjectCreated:Put", "images", "myphoto.jpg"),
    "minio_docs__kafka_kafkacat.json": ("ObjectCreated:Put", "images", "myphoto.jpg"),
    "minio_docs__mysql_row.json": ("ObjectCreated:Put", "images", "myphoto.jpg"),
    "minio_docs__nats_2016.json": ("ObjectCreated:Put", "images", "myphoto.jpg"),
    "minio_docs__nats_streaming.json": ("ObjectCreated:Put", "images", "myphoto.jpg"),
    "minio_docs__postgres_row.json": ("ObjectCreated:Put", "images", "myphoto.jpg"),
    "ceph_doc__notifications_event.json": ("ObjectCreated:Put", "mybucket1", "myimage1.jpg"),
}
REFUSED = {
    "awsdocs__s3_structure_template_v2_2.txt": "malformed_json",  # unquoted placeholders
    "minio_docs__mqtt_curly_quotes.txt": "malformed_json",  # typographic quotes
    "awsdocs_sns__notification_hello_world.json": "malformed_json",  # the SNS Message "Hello world!"
    "awslambdago__sns-event.json": "bad_record",  # Lambda-shaped SNS and SQS events, not what a trigger receives
    "awslambdago__sqs-event.json": "bad_record",
    "powertools__s3SqsEvent.json": "bad_record",
    "powertools__snsSqsEvent.json": "bad_record",
    "powertools__snsSqsFifoEvent.json": "bad_record",
    "minio_issue15200__post_empty_fields.json": "bad_record",  # the reporter blanked the bucket
    "miniojs_issue1041__post_slash_key.json": "bad_record",
    "powertools__s3EventBridgeNotificationObjectCreatedEvent.json": "not_s3_event",  # EventBridge's shape
    "powertools__s3EventBridgeNotificationObjectDeletedEvent.json": "not_s3_event",
    "powertools__s3ObjectEventIAMUser.json": "not_s3_event",  # S3 Object Lambda
    "java__lambda_destination_event.json": "not_s3_event",  # Lambda destination records
    "cdk__destination_success_record.json": "not_s3_event",
    "cdk__destination_failure_record.json": "not_s3_event",
    "minio_docs__elasticsearch_search_response.json": "not_s3_event",  # the search response, not the document
    "minio_docs__redis_hset_value.json": "not_s3_event",  # a JSON string that holds the notification
    "readme__unicode_key_records_list.json": "not_s3_event",  # a bare array of records
    "localstack__sqs_snapshot_extract.json": "not_s3_event",  # the snapshot file itself
    "localstack__sns_snapshot_extract.json": "not_s3_event",
}


def test_every_vector_is_in_one_of_the_tables() -> None:
    files = {p.name for p in VECTORS.iterdir()} - {"MANIFEST.md"}
    subscription = {"awsdocs__s3_testevent.json", "awsdocs_sns__subscription_confirmation.json",
                    "awsdocs_sns__unsubscribe_confirmation.json"}  # fmt: skip
    assert files == set(ACCEPTED) | set(REFUSED) | subscription


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_a_real_notification_gives_its_event(name: str) -> None:
    assert events((VECTORS / name).read_bytes()) == [ACCEPTED[name]]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_is_not_a_notification_is_refused_with_its_reason(name: str) -> None:
    assert refused((VECTORS / name).read_bytes()) == REFUSED[name]


def test_test_events_and_subscription_messages_ask_for_nothing() -> None:
    assert parse_notification((VECTORS / "awsdocs__s3_testevent.json").read_bytes()).test_event
    for name, kind in (("awsdocs_sns__subscription_confirmation.json", "SubscriptionConfirmation"),
                       ("awsdocs_sns__unsubscribe_confirmation.json", "UnsubscribeConfirmation")):  # fmt: skip
        note = parse_notification((VECTORS / name).read_bytes())
        assert note.sns_type == kind and note.events == []
    # The TestEvent inside the SNS docs' envelope, as SNS delivers it to an HTTP subscription.
    envelope = load("awsdocs_sns__notification_hello_world.json")
    envelope["Message"] = (VECTORS / "awsdocs__s3_testevent.json").read_text()
    note = parse_notification(orjson.dumps(envelope))
    assert note.test_event and note.sns_type == "Notification"


# -- the inner bodies the MANIFEST says a trigger would receive ----------------------------------------------------


def test_urlencoded_keys_agree_with_the_decoded_key_aws_ships_alongside() -> None:
    for name in ("awslambdago__s3-event-with-decoded.json", "java__s3_event.json"):
        record = load(name)["Records"][0]
        oracle = record["s3"]["object"].get("urlDecodedKey")
        if oracle is not None:
            assert events(load(name))[0][2] == oracle


def test_sqs_bodies_are_notifications_and_sns_in_sqs_is_not_s3() -> None:
    body = load("powertools__s3SqsEvent.json")["Records"][0]["body"]
    note = parse_notification(body)
    assert len(note.events) == 1 and note.events[0].version_id
    for name in ("powertools__snsSqsEvent.json", "powertools__snsSqsFifoEvent.json"):
        assert refused(load(name)["Records"][0]["body"]) == "not_s3_event"


def test_localstack_recordings_of_aws_decode_one_by_one_and_together() -> None:
    recorded = load("localstack__sqs_snapshot_extract.json")
    keys: list[str] = []
    for case, snapshot in recorded.items():
        messages = snapshot["recorded-content"]["receive_messages"]["messages"]
        bodies = [m["Body"] for m in messages] if "Body" in messages[0] else [{"Records": [m]} for m in messages]
        for body in bodies:
            got = parse_notification(body)
            assert got.test_event or len(got.events) == 1, case
            keys += [e.key for e in got.events]
        if "Body" not in messages[0]:
            assert len(parse_notification({"Records": messages}).events) == len(messages)  # many in one message
    assert "a@b" in keys  # a%40b, URL-decoded
    multipart = recorded[next(k for k in recorded if k.endswith("complete_multipart_upload"))]
    etags = [m["s3"]["object"]["eTag"] for m in multipart["recorded-content"]["receive_messages"]["messages"]]
    assert any(e.endswith("-1") for e in etags)


def test_an_sns_envelope_decodes_with_its_message_as_an_object_or_as_the_wire_string() -> None:
    snapshot = next(iter(load("localstack__sns_snapshot_extract.json").values()))
    envelope = snapshot["recorded-content"]["receive_messages"]["messages"][0]
    as_stored = parse_notification(envelope)
    on_the_wire = parse_notification({**envelope, "Message": orjson.dumps(envelope["Message"]).decode()})
    assert isinstance(as_stored, Notification) and len(on_the_wire.events) == 1
    assert [e.key for e in as_stored.events] == [e.key for e in on_the_wire.events]


def test_minio_notifications_kept_in_other_stores_decode_once_taken_out() -> None:
    hit = load("minio_docs__elasticsearch_search_response.json")["hits"]["hits"][0]["_source"]
    assert events(hit)[0][1:] == ("images", "myphoto.jpg")
    redis_value = load("minio_docs__redis_hset_value.json")
    assert isinstance(redis_value, str) and events(redis_value)[0][1:] == ("images", "myphoto.jpg")


def test_a_bare_list_of_records_decodes_once_wrapped_with_its_unicode_key() -> None:
    [(_, _, key)] = events({"Records": load("readme__unicode_key_records_list.json")})
    assert key == "你家娃🐱.png"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ((VECTORS / "awsdocs__s3_put_example.json").read_bytes()[:-20], "malformed_json"),  # truncated
        ((VECTORS / "awsdocs__s3_put_example.json").read_text().encode("utf-16"), "malformed_json"),
        (b"", "malformed_json"),
        (b"null", "not_s3_event"),
    ],
    ids=["truncated", "utf-16", "empty", "null"],
)
def test_derived_broken_inputs_are_refused_with_a_reason(body: bytes, reason: str) -> None:
    assert refused(body) == reason


def test_no_records_at_all_is_refused() -> None:
    assert refused(b'{"Records": []}') == "not_s3_event"
