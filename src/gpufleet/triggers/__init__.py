"""Triggers turn source messages into published tasks. ``base.py`` has the shared work, one module per source."""

from __future__ import annotations

from gpufleet.errors import ConfigError
from gpufleet.urls import Endpoint, parse_url

# The webhook is served by the api role (POST /v1/webhooks/<path>), not by `gpufleet trigger`.
BACKENDS = {
    "kafka": "gpufleet.triggers.kafka:KafkaTrigger",
    "sqs": "gpufleet.triggers.sqs:SqsTrigger",
    "s3": "gpufleet.triggers.poll:PollTrigger",
    "webhook": "gpufleet.api.webhooks:WebhookTrigger",
}
SERVED_BY_API = frozenset({"webhook"})


def parse_source(url: str, *, where: str | None = None, key: str | None = None) -> Endpoint:
    """Validate a trigger source URL; raises ConfigError naming ``where`` and ``key``.

    ``kafka:///topic``, ``sqs:///queue-name``, ``webhook:///path`` (served at ``/v1/webhooks/path``) and
    ``s3://bucket/prefix`` (polling; the bucket is the URL's host).
    """
    if url.startswith("s3://"):
        from gpufleet.objects import parse_s3_uri

        try:
            bucket, prefix = parse_s3_uri(url)
        except ValueError as exc:
            raise ConfigError(str(exc), file=where, key=key, fix="s3://bucket or s3://bucket/prefix") from None
        return Endpoint(url=url, scheme="s3", hosts=bucket, path=prefix, options={})
    return parse_url(url, BACKENDS, where=where, key=key, what="trigger source")
