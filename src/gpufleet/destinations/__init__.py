"""Destinations receive callback and dead-letter records, opened from their URL through the scheme table.

``base.py`` has the interface; one module per kind, each with its URL form and options in its docstring. A URL's
query (for http and https, whose query is the receiver's, its fragment) holds the options its class declares
(``OPTIONS``, a pydantic model): an option the scheme does not take is a configuration error that names the file,
the key and the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from gpufleet.credentials import redact_url
from gpufleet.errors import ConfigError
from gpufleet.urls import Endpoint, import_backend, parse_options, parse_url

if TYPE_CHECKING:
    from gpufleet.destinations.base import Destination, Reader
    from gpufleet.settings import FleetSettings

BACKENDS = {
    "kafka": "gpufleet.destinations.kafka:KafkaDestination",
    "http": "gpufleet.destinations.http:HttpDestination",
    "https": "gpufleet.destinations.http:HttpDestination",
    "s3": "gpufleet.destinations.s3:S3Destination",
    "sqs": "gpufleet.destinations.sqs:SqsDestination",
    "sns": "gpufleet.destinations.sns:SnsDestination",
    "amqp": "gpufleet.destinations.amqp:AmqpDestination",
    "amqps": "gpufleet.destinations.amqp:AmqpDestination",
    "memory": "gpufleet.destinations.memory:MemoryDestination",
}
# The kinds whose records can be read back where they landed (gpufleet tail): their Reader class.
READERS = {
    "kafka": "gpufleet.destinations.kafka:KafkaReader",
    "s3": "gpufleet.destinations.s3:S3Reader",
    "sqs": "gpufleet.destinations.sqs:SqsReader",
    "amqp": "gpufleet.destinations.amqp:AmqpReader",
    "amqps": "gpufleet.destinations.amqp:AmqpReader",
}
LOGINS = frozenset({"http", "https", "amqp", "amqps"})  # the kinds that log in with a URL's user and password
PATHLESS = frozenset({"http", "https", "s3", "amqp", "amqps"})  # may name no path: https://host, amqp://host
FRAGMENT_OPTIONS = frozenset({"http", "https"})  # their query is the receiver's


def parse_destination(
    url: str, *, where: str | None = None, key: str | None = None, env: Mapping[str, str] | None = None
) -> Endpoint:
    """Validate a destination URL and its options; with ``env``, also that the variables its ``*_env`` options
    name are set (and that a secret is strong). Raises ConfigError naming ``where`` and ``key``."""
    endpoint = parse_url(url, BACKENDS, where=where, key=key, what="destination", pathless=PATHLESS)
    if endpoint.scheme not in LOGINS and "@" in (endpoint.hosts or ""):  # a secret with nothing to use it
        raise ConfigError(
            f"destination URL {redact_url(url)!r} carries a user or password, which {endpoint.scheme}:// does not use",
            file=where,
            key=key,
            fix="remove it: S3, SQS and SNS use the s3 section's keys, Kafka its section",
        )
    if endpoint.scheme in FRAGMENT_OPTIONS:
        endpoint = dataclasses.replace(endpoint, options=dict(parse_qsl(urlsplit(url).fragment)))
    options = import_backend(BACKENDS[endpoint.scheme]).OPTIONS  # type: ignore[attr-defined]
    parse_options(endpoint, options, what="destination", where=where, key=key, env=env)
    return endpoint


def open_destination(url: str, settings: FleetSettings) -> Destination:
    """The destination for ``url``. Opening connects to nothing: the first delivery does, and its failure is
    retriable like any other.

    Raises:
        ConfigError: the URL or its options are not valid.
    """
    endpoint = parse_destination(url)
    cls = import_backend(BACKENDS[endpoint.scheme])
    destination: Destination = cls(endpoint, settings)
    return destination


def open_reader(url: str, settings: FleetSettings) -> Reader | None:
    """What reads back the records ``url`` receives, or None for a kind whose records cannot be read back where they
    land (http, sns, memory). Opening connects to nothing.

    Raises:
        ConfigError: the URL or its options are not valid.
    """
    endpoint = parse_destination(url)
    if endpoint.scheme not in READERS:
        return None
    reader: Reader = import_backend(READERS[endpoint.scheme])(endpoint, settings)
    return reader
