"""What a trigger file may hold: the keys every trigger takes, and the keys of triggers that read object events.

Each trigger class declares its own keys beside it, as a subclass of :class:`TriggerSettings` (``Settings``), and
the options of its source URL as ``OPTIONS`` (a :class:`gpufleet.urls.Options` model). A trigger that always reads
S3 event notifications (SQS, webhooks, polling) has :class:`ObjectEvents` in its ``Settings``; Kafka and AMQP get
it with ``format: s3`` (see :func:`gpufleet.triggers.settings_model`). A key the scheme does not take is a
configuration error that names the file, the key and the fix.

This module imports only pydantic: :mod:`gpufleet.settings` imports it, never the other way round.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gpufleet.registry.messages import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY


class TriggerSettings(BaseModel):
    """The keys of every ``triggers/*.yaml`` file: a source bound to a function and its destinations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: str
    # The function every message goes to; when absent, each message names it: {"function": ..., "payload": ...}.
    function: str | None = None
    # What the messages are: "json" (an event, or the routing envelope above) or "s3" (S3 event notifications).
    format: Literal["json", "s3"] = "json"
    id_field: str | None = "id"
    id_header: str | None = "gpufleet-id"
    # A task's priority, 0 (lowest) to 9 (highest): the message's priority_header, else its priority_field (the
    # routing envelope's "priority" is always read), else an AMQP message's own priority, else this.
    priority: int = Field(DEFAULT_PRIORITY, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    priority_header: str | None = "gpufleet-priority"
    priority_field: str | None = None
    batch_max: int = Field(500, ge=1, le=50_000)
    max_payload_bytes: int | None = Field(None, ge=1)
    dead_letter: str | None = None
    on_success: str | None = None
    on_failure: str | None = None
    enabled: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from gpufleet.intake.ids import trigger_name_error

        error = trigger_name_error(v)
        if error is not None:
            raise ValueError(error)
        return v

    @property
    def scheme(self) -> str:
        """The source's transport (checked against the backends at load)."""
        return self.source.split(":", 1)[0]

    @property
    def object_events(self) -> bool:
        return isinstance(self, ObjectEvents)

    def resolved(self, env: Mapping[str, str], *, where: str, weak_secrets_allowed: bool) -> Self:
        """Checks that need the environment (a secret named by ``*_env``), once the keys are valid; a scheme with
        such keys overrides it. Raises ConfigError."""
        return self


class ObjectEvents(BaseModel):
    """The keys of a trigger whose messages are S3 event notifications, mixed into its settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    events: tuple[str, ...] = ("ObjectCreated:*",)  # event types, "s3:" prefix optional, "*" wildcards
    prefix: str = ""
    suffix: str = ""
    key_encoding: Literal["auto", "url", "raw"] = "auto"  # auto: URL-decoded unless the record is from Ceph
    # A notification with more records is dead-lettered whole (AWS, MinIO and Ceph send one per message).
    max_records: int = Field(100, ge=1, le=10_000)
    output: str | None = None  # s3://bucket/prefix where ctx.upload() writes outputs

    @field_validator("events")
    @classmethod
    def _events(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from gpufleet.triggers.s3events import EventFilter

        EventFilter(v)  # ValueError names the bad pattern
        return v

    @field_validator("output")
    @classmethod
    def _output(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^s3://[^/]+(/.*)?$", v):
            raise ValueError("use s3://bucket or s3://bucket/prefix")
        return v


OBJECT_KEYS = frozenset(ObjectEvents.model_fields)
