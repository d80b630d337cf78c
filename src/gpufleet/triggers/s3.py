"""Polling trigger, for object stores without notifications (SeaweedFS, plain S3 servers).

URL: ``s3://bucket/prefix`` on the fleet's ``s3`` endpoint. Options: ``poll_interval_s`` (30), ``skip_existing``
(false: the first listing runs what is already there), the object filters and ``output``.

Every interval it lists the prefix (all pages) and compares each object's eTag with a durable checkpoint in
Redis: a hash ``<prefix>:poll:<trigger>`` of key -> eTag. New and changed objects are published first, then
written to the checkpoint, page by page. So:
- a restart lists again and finds nothing new: nothing runs twice (and a crash between publish and checkpoint
  re-publishes ids that already exist, which are suppressed as duplicates);
- objects written while the trigger was down are new at the next listing: nothing is missed;
- once a listing completes, keys no longer in the bucket leave the checkpoint, so a deleted and re-uploaded
  object runs again.
The checkpoint costs ~100 bytes of Redis per object; each listing costs one LIST call per 1000 objects.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import Field

from gpufleet.aws import ObjectEvent, make_client, transient_errors
from gpufleet.delivery.records import iso
from gpufleet.registry.keyspace import Keyspace
from gpufleet.triggers.base import SourceTrigger
from gpufleet.triggers.ingest import Ingest, SourceMessage
from gpufleet.triggers.options import ObjectEvents, TriggerSettings

if TYPE_CHECKING:
    from gpufleet.config import Fleet

log = structlog.get_logger("gpufleet.trigger.poll")


class PollSettings(ObjectEvents, TriggerSettings):
    poll_interval_s: float = Field(30.0, gt=0)
    skip_existing: bool = False  # objects present at the first listing are marked seen, not run


class PollTrigger(SourceTrigger[PollSettings]):
    Settings = PollSettings

    def __init__(self, fleet: Fleet, trigger: PollSettings, ingest: Ingest | None = None) -> None:
        super().__init__(fleet, trigger, ingest)
        self.bucket, self.prefix = self.endpoint.hosts or "", self.endpoint.path
        self.redis = self.ingest.registry.client
        self.checkpoint = Keyspace(fleet.settings.redis.key_prefix).poll(trigger.name)
        self.listings = 0

    def run(self, stop: threading.Event) -> None:
        from redis import RedisError

        retried: tuple[type[Exception], ...] = (*transient_errors(), RedisError)

        s3 = make_client("s3", self.fleet.settings.s3)
        log.info(
            "polling trigger started",
            trigger=self.name,
            bucket=self.bucket,
            prefix=self.prefix,
            interval_s=self.trigger.poll_interval_s,
        )
        try:
            while not stop.is_set():
                try:
                    if not self.poll_once(s3, stop):
                        return  # stopping mid-listing: the checkpoint holds what was published
                except retried as exc:
                    log.warning("listing failed; trying again at the next interval", error=str(exc))
                stop.wait(self.trigger.poll_interval_s)
        finally:
            self.close()
            log.info("polling trigger stopped", trigger=self.name, listings=self.listings, **self.stats)

    def poll_once(self, s3: Any, stop: threading.Event) -> bool:
        """List the prefix once and publish what is new. False if ``stop`` interrupted a publish."""
        first = not self.redis.exists(self.checkpoint)
        skip = first and self.trigger.skip_existing
        listed: set[str] = set()
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            objects = [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]  # "folders"
            if not objects:
                continue
            keys = [o["Key"] for o in objects]
            listed.update(keys)
            known = self.redis.hmget(self.checkpoint, keys)
            etags = [_etag(o) for o in objects]
            fresh = [(o, etag) for o, etag, seen in zip(objects, etags, known, strict=True) if seen != etag.encode()]
            if not fresh:
                continue
            if not skip and not self._publish([self._event(o, etag) for o, etag in fresh], stop):
                return False
            self.redis.hset(self.checkpoint, mapping={o["Key"]: etag for o, etag in fresh})
        self._forget_deleted(listed)
        self.listings += 1
        if skip:
            log.info("first listing: existing objects marked seen, not run", trigger=self.name, count=len(listed))
        return True

    def _publish(self, events: list[ObjectEvent], stop: threading.Event) -> bool:
        """New objects go through the intake path every trigger takes: one message per object, its event's JSON the
        bytes a dead letter quotes; the trigger's filters drop (and count as ignored) what it does not want."""
        messages = [
            SourceMessage(e.model_dump_json().encode(), f"s3:{self.bucket}/{e.key}", default_id="", objects=(e,))
            for e in events
        ]
        return self.ingest.publish(self.ingest.prepare(messages), stop) is not None

    def _event(self, obj: dict[str, Any], etag: str) -> ObjectEvent:
        modified = obj.get("LastModified")
        return ObjectEvent(
            bucket=self.bucket,
            key=obj["Key"],
            event_type="ObjectCreated:Listed",
            size=obj.get("Size"),
            etag=etag,
            event_time=iso(modified.timestamp()) if modified is not None else None,
            source="poll",
        )

    def _forget_deleted(self, listed: set[str]) -> None:
        known: list[bytes] = self.redis.hkeys(self.checkpoint)  # type: ignore[assignment]
        gone = [k for k in (key.decode() for key in known) if k not in listed]
        for i in range(0, len(gone), 1000):
            self.redis.hdel(self.checkpoint, *gone[i : i + 1000])


def _etag(obj: dict[str, Any]) -> str:
    return str(obj.get("ETag", "")).strip('"')
