"""Triggers turn source messages into published tasks. ``base.py`` has the shared work, one module per source."""

from __future__ import annotations

from gpufleet.urls import Endpoint, parse_url

BACKENDS = {
    "kafka": "gpufleet.triggers.kafka:KafkaTrigger",
}


def parse_source(url: str, *, where: str | None = None, key: str | None = None) -> Endpoint:
    """Validate a trigger source URL; raises ConfigError naming ``where`` and ``key``."""
    return parse_url(url, BACKENDS, where=where, key=key, what="trigger source")
