"""Triggers turn source messages into published tasks. ``base.py`` has the shared work, one module per source.

Each trigger class declares, beside it, the keys of its trigger file (``Settings``, a subclass of
:class:`~gpufleet.triggers.options.TriggerSettings`), the options of its source URL (``OPTIONS``) and the role
that serves it (``served_by``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, cast

from pydantic import create_model

from gpufleet.errors import ConfigError, did_you_mean
from gpufleet.triggers.options import OBJECT_KEYS, ObjectEvents, TriggerSettings
from gpufleet.urls import Endpoint, import_backend, parse_options, parse_url

BACKENDS = {
    "kafka": "gpufleet.triggers.kafka:KafkaTrigger",
    "sqs": "gpufleet.triggers.sqs:SqsTrigger",
    "s3": "gpufleet.triggers.s3:PollTrigger",
    "webhook": "gpufleet.triggers.webhook:WebhookTrigger",
    "amqp": "gpufleet.triggers.amqp:AmqpTrigger",
    "amqps": "gpufleet.triggers.amqp:AmqpTrigger",
}
AMQP = frozenset({"amqp", "amqps"})  # the path is the vhost, and may be empty


def backend(scheme: str) -> Any:
    """The trigger class for a scheme (checked by :func:`parse_source`)."""
    return import_backend(BACKENDS[scheme])


def served_by(scheme: str) -> str:
    """The role that serves a trigger of this scheme: ``trigger`` (``gpufleet trigger``), or ``api`` (webhooks,
    served by ``gpufleet api``). Declared by the trigger class."""
    return str(getattr(backend(scheme), "served_by", "trigger"))


def always_objects(scheme: str) -> bool:
    """Whether the scheme's messages are always S3 event notifications (SQS, webhooks, polling)."""
    return issubclass(backend(scheme).Settings, ObjectEvents)


def settings_model(scheme: str, fmt: Any) -> type[TriggerSettings]:
    """The model of a trigger file: its class's ``Settings``, with the object-event keys for ``format: s3``."""
    model: type[TriggerSettings] = backend(scheme).Settings
    return _with_objects(model) if fmt == "s3" and not issubclass(model, ObjectEvents) else model


@functools.cache
def _with_objects(model: type[TriggerSettings]) -> type[TriggerSettings]:
    bases: Any = (ObjectEvents, model)  # pydantic merges the fields of both, in this order
    return cast(type[TriggerSettings], create_model(f"{model.__name__}WithObjects", __base__=bases))


def check_keys(scheme: str, keys: Iterable[str], fmt: Any, *, where: str) -> None:
    """Refuse a key the trigger's scheme does not take (``poll_interval_s`` on a Kafka trigger), and ``format:
    json`` where the messages are always S3 events, before the keys' values are validated.

    Raises:
        ConfigError: naming the file, the key and the fix.
    """
    if always_objects(scheme) and fmt == "json":
        raise ConfigError(
            f"{scheme} triggers always read S3 event notifications",
            file=where,
            key="format",
            fix="remove `format: json` (or use a kafka or amqp source for JSON events)",
        )
    allowed = set(settings_model(scheme, fmt).model_fields)
    for key in sorted(set(keys) - allowed):
        if key in OBJECT_KEYS:
            raise ConfigError(
                f"{scheme} triggers take no {key!r}",
                file=where,
                key=key,
                fix="it is for S3 event notifications: add `format: s3`, or remove it",
            )
        own = sorted(allowed - set(TriggerSettings.model_fields)) or "nothing more"
        fix = did_you_mean(key, allowed) or f"remove it; besides the common keys, {scheme} triggers take {own}"
        elsewhere = any(key in backend(other).Settings.model_fields for other in BACKENDS)
        raise ConfigError(
            f"{scheme} triggers take no {key!r}" if elsewhere else "unknown key", file=where, key=key, fix=fix
        )


def parse_source(
    url: str, *, where: str | None = None, key: str | None = None, env: Mapping[str, str] | None = None
) -> Endpoint:
    """Validate a trigger source URL and its options (declared by the class as ``OPTIONS``); with ``env``, also
    that the variables its ``*_env`` options name are set. Raises ConfigError naming ``where`` and ``key``.

    ``kafka:///topic``, ``sqs:///queue-name``, ``webhook:///path`` (served at ``/v1/webhooks/path``),
    ``s3://bucket/prefix`` (polling; the bucket is the URL's host) and ``amqp://host/vhost?queue=NAME``.
    """
    if url.startswith("s3://"):
        from gpufleet.aws import parse_s3_uri

        try:
            bucket, prefix = parse_s3_uri(url)
        except ValueError as exc:
            raise ConfigError(str(exc), file=where, key=key, fix="s3://bucket or s3://bucket/prefix") from None
        return Endpoint(url=url, scheme="s3", hosts=bucket, path=prefix, options={})
    endpoint = parse_url(url, BACKENDS, where=where, key=key, what="trigger source", pathless=AMQP)
    parse_options(endpoint, backend(endpoint.scheme).OPTIONS, what="trigger source", where=where, key=key, env=env)
    return endpoint
