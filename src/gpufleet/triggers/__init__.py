"""Triggers turn source messages into published tasks. ``base.py`` has the shared work, one module per source."""

from __future__ import annotations

from collections.abc import Iterable

from gpufleet.errors import ConfigError
from gpufleet.urls import Endpoint, import_backend, parse_url

BACKENDS = {
    "kafka": "gpufleet.triggers.kafka:KafkaTrigger",
    "sqs": "gpufleet.triggers.sqs:SqsTrigger",
    "s3": "gpufleet.triggers.poll:PollTrigger",
    "webhook": "gpufleet.triggers.webhook:WebhookTrigger",
    "amqp": "gpufleet.triggers.amqp:AmqpTrigger",
    "amqps": "gpufleet.triggers.amqp:AmqpTrigger",
}
AMQP = frozenset({"amqp", "amqps"})  # the path is the vhost, and may be empty
# Keys every trigger file may hold; a trigger class adds its own in KEYS, and object-event triggers OBJECT_KEYS.
COMMON_KEYS = frozenset({"name", "source", "function", "format", "id_field", "id_header", "batch_max",
                         "max_payload_bytes", "dead_letter", "on_success", "on_failure", "enabled"})  # fmt: skip
OBJECT_KEYS = frozenset({"events", "prefix", "suffix", "key_encoding", "max_records", "output"})
ALWAYS_OBJECTS = frozenset({"sqs", "webhook", "s3"})  # schemes whose messages are S3 event notifications


def served_by(scheme: str) -> str:
    """The role that serves a trigger of this scheme: ``trigger`` (``gpufleet trigger``), or ``api`` (webhooks,
    served by ``gpufleet api``). Declared by the trigger class."""
    return str(getattr(import_backend(BACKENDS[scheme]), "served_by", "trigger"))


def check_keys(scheme: str, keys: Iterable[str], fmt: str | None, *, where: str) -> None:
    """Refuse a key the trigger's scheme does not take (``poll_interval_s`` on a Kafka trigger), and ``format:
    json`` where the messages are always S3 events.

    Raises:
        ConfigError: naming the file, the key and the fix.
    """
    from gpufleet.settings import did_you_mean

    own: frozenset[str] = import_backend(BACKENDS[scheme]).KEYS  # type: ignore[attr-defined]
    objects = scheme in ALWAYS_OBJECTS or fmt == "s3"
    allowed = COMMON_KEYS | own | (OBJECT_KEYS if objects else frozenset())
    for key in sorted(set(keys) - allowed):
        hint = did_you_mean(key, sorted(allowed))
        takes = sorted(own | (OBJECT_KEYS if objects else frozenset()))
        fix = hint or f"remove it; besides the common keys, {scheme} triggers take {takes or 'nothing more'}"
        if key in OBJECT_KEYS and not objects:
            fix = "it is for S3 event notifications: add `format: s3`, or remove it"
        raise ConfigError(f"{scheme} triggers take no {key!r}", file=where, key=key, fix=fix)
    if scheme in ALWAYS_OBJECTS and fmt == "json":
        raise ConfigError(f"{scheme} triggers always read S3 event notifications", file=where, key="format",
                          fix="remove `format: json` (or use a kafka or amqp source for JSON events)")  # fmt: skip


def parse_source(url: str, *, where: str | None = None, key: str | None = None) -> Endpoint:
    """Validate a trigger source URL; raises ConfigError naming ``where`` and ``key``.

    ``kafka:///topic``, ``sqs:///queue-name``, ``webhook:///path`` (served at ``/v1/webhooks/path``),
    ``s3://bucket/prefix`` (polling; the bucket is the URL's host) and ``amqp://host/vhost?queue=NAME``.
    """
    if url.startswith("s3://"):
        from gpufleet.objects import parse_s3_uri

        try:
            bucket, prefix = parse_s3_uri(url)
        except ValueError as exc:
            raise ConfigError(str(exc), file=where, key=key, fix="s3://bucket or s3://bucket/prefix") from None
        return Endpoint(url=url, scheme="s3", hosts=bucket, path=prefix, options={})
    endpoint = parse_url(url, BACKENDS, where=where, key=key, what="trigger source", pathless=AMQP)
    if endpoint.scheme in AMQP:
        unknown = sorted(set(endpoint.options) - {"queue", "password_env"})
        if not endpoint.options.get("queue") or unknown:
            fix = "amqp://user@host:5672/vhost?queue=gpufleet.requests"
            got = f"options {unknown}" if unknown else "no queue"
            raise ConfigError(f"an amqp source takes ?queue=NAME (and password_env=VAR); got {got}", file=where,
                              key=key, fix=fix)  # fmt: skip
    return endpoint
