"""Destinations receive callback and dead-letter records. ``base.py`` has the interface, one module per kind."""

from __future__ import annotations

from gpufleet.urls import Endpoint, parse_url

BACKENDS = {
    "kafka": "gpufleet.destinations.kafka:KafkaDestination",
}


def parse_destination(url: str, *, where: str | None = None, key: str | None = None) -> Endpoint:
    """Validate a destination URL; raises ConfigError naming ``where`` and ``key``."""
    return parse_url(url, BACKENDS, where=where, key=key, what="destination")
