"""One parser for the S3 event record family, whatever server sent it and whatever carried it.

Accepted bodies (bytes, str, or an already decoded mapping):

- ``{"Records": [...]}`` from AWS S3 (``eventName`` without ``s3:``, key URL-encoded with ``+`` for a space),
  moto (the same, with ``/`` encoded too and no ``versionId``/``sequencer``), MinIO (``eventSource`` ``minio:s3``,
  ``eventName`` keeps ``s3:``, key Go-``QueryEscape``d, a redundant top-level ``EventName``/``Key`` that is ignored)
  and Ceph RGW (``eventSource`` ``ceph:s3``, the key RAW, ``size`` maybe a string, ``etag`` maybe lowercase,
  ``versionId`` ``""`` when unversioned);
- ``s3:TestEvent`` (sent when a notification is configured): no events and ``test_event=True``, to acknowledge;
- an SNS envelope (``Type`` + ``TopicArn``) around either; with ``RawMessageDelivery`` the body is bare S3 JSON.

Keys are decoded per ``key_encoding``: ``auto`` (``unquote_plus`` unless ``eventSource`` is ``ceph:s3``), ``url``
(always) or ``raw`` (never). A message that cannot be read raises :class:`EventError` with a stable reason:
``malformed_json``, ``not_s3_event``, ``bad_record`` or ``too_many_records``. One bad record makes the whole message
a dead letter, so a message is never half processed.

:class:`EventFilter` says which decoded events a trigger wants. It is applied by the caller, not here, so a filtered
message is acknowledged and ignored rather than dead-lettered.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import unquote_plus

import orjson

from gpufleet.aws import MAX_KEY_BYTES, ObjectEvent
from gpufleet.errors import EventError

KEY_ENCODINGS = ("auto", "url", "raw")
SNS_TYPES = frozenset({"Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"})
# Ceph RGW writes the object name as it is; every other server URL-encodes it.
_RAW_KEY_SOURCES = frozenset({"ceph:s3"})
# MinIO expands s3:ObjectCreated:* and s3:ObjectRemoved:* to these too, yet none of them changes an object's content
# (internal/event/name.go), so a wildcard must not start work for them. Naming one explicitly still does.
METADATA_ONLY_EVENTS = frozenset(
    {
        "ObjectCreated:PutTagging",
        "ObjectCreated:DeleteTagging",
        "ObjectCreated:PutRetention",
        "ObjectCreated:PutLegalHold",
        "ObjectRemoved:NoOP",  # a DELETE of a key that did not exist
    }
)
_PATTERN = re.compile(r"(?:s3:)?[A-Za-z0-9*?\[\]!]+:[A-Za-z0-9*?\[\]!]+")
_GLOB_CHARS = frozenset("*?[")
MAX_FIELD_CHARS = 3 * MAX_KEY_BYTES  # a URL-encoded key of that length; every other field is far shorter
MAX_SIZE = 2**63 - 1
_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}


@dataclass(frozen=True)
class Notification:
    """One decoded message: its object events, or a reason to acknowledge it without work."""

    events: list[ObjectEvent]  # every record, decoded, in message order (filters are applied by the caller)
    test_event: bool = False  # an s3:TestEvent (no Records): acknowledge and ignore, never dead-letter
    sns_type: str | None = None  # "Notification" | "SubscriptionConfirmation" | "UnsubscribeConfirmation"
    sns: dict[str, Any] | None = None  # the whole SNS envelope (TopicArn, MessageId, SubscribeURL, Token, ...)


def parse_notification(
    body: bytes | str | Mapping[str, Any], key_encoding: str = "auto", max_records: int = 100
) -> Notification:
    """Decode one S3 event message.

    Args:
        body: the message as received, or its JSON already decoded.
        key_encoding: ``auto``, ``url`` or ``raw`` (see the module docstring).
        max_records: more records than this make the whole message a ``too_many_records`` dead letter. AWS, MinIO
            and Ceph send one record per message; a flood is refused before any record is decoded.

    Returns:
        The events of every record, in order; none for a TestEvent or an SNS subscription message.

    Raises:
        EventError: ``malformed_json``, ``not_s3_event``, ``bad_record`` or ``too_many_records``; the detail says
            what and where.
        ValueError: ``key_encoding`` is not one of :data:`KEY_ENCODINGS`.
    """
    if key_encoding not in KEY_ENCODINGS:
        raise ValueError(f"key_encoding must be one of {', '.join(KEY_ENCODINGS)}, not {key_encoding!r}")
    doc = body if isinstance(body, Mapping) else _load(body, "the message")
    return _parse(doc, key_encoding, max_records, sns_allowed=True)


class EventFilter:
    """Which object events a trigger wants: event-type patterns plus a prefix and suffix of the decoded key.

    Patterns are fnmatch-style and case-sensitive, as S3's are; the ``s3:`` prefix is optional
    (``ObjectCreated:*``, ``s3:ObjectCreated:Put``, ``ObjectRemoved:*``). A wildcard never matches the
    :data:`METADATA_ONLY_EVENTS` that MinIO files under ``ObjectCreated``/``ObjectRemoved``; an exact pattern does.

    Raises:
        ValueError: no pattern, or one that is not ``Family:Name``.
    """

    __slots__ = ("_exact", "_wild", "events", "prefix", "suffix")

    def __init__(self, events: Iterable[str] = ("ObjectCreated:*",), prefix: str = "", suffix: str = "") -> None:
        patterns = (events,) if isinstance(events, str) else tuple(events)
        if not patterns:
            raise ValueError("no event patterns: give at least one, e.g. 'ObjectCreated:*'")
        for pattern in patterns:
            if not isinstance(pattern, str) or not _PATTERN.fullmatch(pattern):
                raise ValueError(
                    f"event pattern {pattern!r} is not Family:Name, e.g. 'ObjectCreated:*' or 's3:ObjectRemoved:Delete'"
                )
        self.events = tuple(p.removeprefix("s3:") for p in patterns)
        self.prefix = prefix
        self.suffix = suffix
        self._exact = frozenset(p for p in self.events if _GLOB_CHARS.isdisjoint(p))
        wild = [fnmatch.translate(p) for p in self.events if not _GLOB_CHARS.isdisjoint(p)]
        self._wild = re.compile("|".join(wild)) if wild else None

    def matches(self, event: ObjectEvent) -> bool:
        key = event.key
        if not key.startswith(self.prefix) or not key.endswith(self.suffix):
            return False
        event_type = event.event_type
        if event_type in self._exact:
            return True
        if self._wild is None or event_type in METADATA_ONLY_EVENTS:
            return False
        return self._wild.match(event_type) is not None

    def __repr__(self) -> str:
        return f"EventFilter(events={list(self.events)!r}, prefix={self.prefix!r}, suffix={self.suffix!r})"


def _load(body: bytes | str, what: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # also invalid UTF-8
        raise EventError("malformed_json", f"{what} is not JSON: {exc}") from None


def _parse(doc: Any, key_encoding: str, max_records: int, *, sns_allowed: bool) -> Notification:
    if not isinstance(doc, Mapping):
        raise EventError("not_s3_event", f"expected a JSON object, got {_kind(doc)}")
    records = doc.get("Records")
    if records is not None:  # MinIO's top-level EventName/Key repeat the record: ignored
        if not isinstance(records, list):
            raise EventError("not_s3_event", f"Records is {_kind(records)}, not an array")
        if not records:
            raise EventError("not_s3_event", "Records is empty")
        if len(records) > max_records:
            raise EventError("too_many_records", f"{len(records)} records > max_records {max_records}")
        return Notification(events=[_record(record, i, key_encoding) for i, record in enumerate(records)])
    if doc.get("Event") == "s3:TestEvent":
        return Notification(events=[], test_event=True)
    sns_type = doc.get("Type")
    if sns_allowed and sns_type in SNS_TYPES and "TopicArn" in doc:
        envelope = dict(doc)
        if sns_type != "Notification":
            return Notification(events=[], sns_type=sns_type, sns=envelope)
        message = doc.get("Message")
        if isinstance(message, str | bytes):
            inner = _load(message, "the SNS Message")
        elif isinstance(message, Mapping):
            inner = message
        else:
            raise EventError("not_s3_event", f"SNS Notification whose Message is {_kind(message)}, not a string")
        try:
            parsed = _parse(inner, key_encoding, max_records, sns_allowed=False)
        except EventError as exc:
            raise EventError(exc.reason, f"SNS Message: {exc.detail}") from None
        return Notification(parsed.events, parsed.test_event, sns_type, envelope)
    keys = ", ".join(sorted(str(k) for k in doc)[:10])
    raise EventError("not_s3_event", f"an object with keys [{keys}] is neither S3 Records, an s3:TestEvent nor SNS")


def _record(record: Any, index: int, key_encoding: str) -> ObjectEvent:
    if not isinstance(record, Mapping):
        _bad(index, f"is {_kind(record)}, not an object")
    version = _text(record.get("eventVersion"), "eventVersion", index)
    if version and version.partition(".")[0] != "2":
        _bad(index, f"eventVersion {version!r:.50} is not 2.x")
    name = _text(record.get("eventName"), "eventName", index)
    event_type = name.removeprefix("s3:")
    if not event_type:
        _bad(index, "eventName is missing or empty")
    source = _text(record.get("eventSource"), "eventSource", index) or "aws:s3"
    s3 = record.get("s3")
    if not isinstance(s3, Mapping):
        _bad(index, f"s3 is {_kind(s3)}, not an object")
    bucket = s3.get("bucket")
    bucket_name = _text(bucket.get("name") if isinstance(bucket, Mapping) else None, "s3.bucket.name", index)
    if not bucket_name:
        _bad(index, "s3.bucket.name is missing or empty")
    obj = s3.get("object")
    if not isinstance(obj, Mapping):
        _bad(index, f"s3.object is {_kind(obj)}, not an object")
    raw_key = _text(obj.get("key"), "s3.object.key", index)
    if not raw_key:
        _bad(index, "s3.object.key is missing or empty")
    etag = obj.get("eTag")
    if etag is None:
        etag = obj.get("etag")  # some Ceph releases
    return ObjectEvent(
        bucket=bucket_name,
        key=_decode_key(raw_key, source, key_encoding, index),
        event_type=event_type,
        size=_size(obj.get("size"), index),
        etag=_text(etag, "s3.object.eTag", index).strip('"') or None,
        version_id=_text(obj.get("versionId"), "s3.object.versionId", index) or None,
        sequencer=_text(obj.get("sequencer"), "s3.object.sequencer", index) or None,
        event_time=_text(record.get("eventTime"), "eventTime", index) or None,
        content_type=_text(obj.get("contentType"), "s3.object.contentType", index) or None,
        source=source,
        region=_text(record.get("awsRegion"), "awsRegion", index) or None,  # MinIO sends ""
    )


def _decode_key(raw: str, source: str, key_encoding: str, index: int) -> str:
    if key_encoding == "raw" or (key_encoding == "auto" and source in _RAW_KEY_SOURCES):
        key = raw
    else:
        try:
            key = unquote_plus(raw, errors="strict")
        except UnicodeDecodeError:
            _bad(index, f"s3.object.key {raw!r:.200} is not percent-encoded UTF-8 (is the source's key_encoding raw?)")
    if len(key.encode(errors="surrogatepass")) > MAX_KEY_BYTES:
        _bad(index, f"s3.object.key is longer than S3's limit of {MAX_KEY_BYTES} bytes")
    return key


def _text(value: Any, field: str, index: int) -> str:
    """A string field, or "" when it is absent or null."""
    if value is None:
        return ""
    if not isinstance(value, str):
        _bad(index, f"{field} is {_kind(value)}, not a string")
    if len(value) > MAX_FIELD_CHARS:
        _bad(index, f"{field} has {len(value)} characters, more than any S3 server sends ({MAX_FIELD_CHARS})")
    return value


def _size(value: Any, index: int) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SIZE:
        return value
    # Ceph's documented sample: "1024". Checked before int(), which refuses more than 4,300 digits.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19 and int(value) <= MAX_SIZE:
        return int(value)
    _bad(index, f"s3.object.size {value!r:.50} is not a non-negative integer")


def _bad(index: int, detail: str) -> NoReturn:
    raise EventError("bad_record", f"record {index}: {detail}")


def _kind(value: Any) -> str:
    if value is None:
        return "missing or null"
    return _KINDS.get(type(value), type(value).__name__)
