"""A running task's saved state: ``ctx.checkpoint(state)``, which its next attempt reads as ``ctx.resume_from``.

A state is any JSON value. Up to ``INLINE_MAX`` bytes it lies in Redis beside the task's record (``P:ckpt:<id>``),
kept as long as the record; a larger one goes to the object store under ``worker.checkpoint_url``
(``s3://bucket/prefix``), and Redis says where. Only the attempt that owns the task saves (``checkpoint.lua``), so one
that lost it (its worker frozen past its lease) never overwrites the state of the attempt that took over. A manual
retry is a new event: it starts from nothing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from gpufleet.aws import ObjectStore, parse_s3_uri
from gpufleet.errors import PermanentTaskError, TaskError
from gpufleet.registry.keyspace import script
from gpufleet.registry.store import Registry

INLINE_MAX = 1024 * 1024  # the largest state Redis keeps itself (bytes of JSON)


class Checkpoints:
    """The checkpoints of the tasks one process runs."""

    def __init__(self, registry: Registry, objects: Callable[[], ObjectStore], url: str | None, ttl_s: int) -> None:
        self.registry, self.objects, self.url, self.ttl_s = registry, objects, url, ttl_s
        self._save = registry.client.register_script(script("checkpoint"))

    def save(self, task_id: str, token: str, state: Any) -> int:
        """Save ``state`` as the task's last checkpoint; returns its size in bytes.

        Raises:
            PermanentTaskError: ``BadCheckpoint``: not JSON, or over ``INLINE_MAX`` with no ``worker.checkpoint_url``.
            TaskError: this attempt no longer owns the task.
        """
        try:
            blob = orjson.dumps(state)
        except TypeError as exc:
            raise PermanentTaskError("BadCheckpoint", f"a checkpoint is JSON: {exc}") from None
        stored = b'{"state":' + blob + b"}"
        if len(blob) > INLINE_MAX:
            if not self.url:
                raise PermanentTaskError(
                    "BadCheckpoint",
                    f"a checkpoint of {len(blob)} bytes is over {INLINE_MAX} (what Redis keeps); set "
                    "worker.checkpoint_url (s3://bucket/prefix) to keep larger ones in the object store",
                )
            bucket, prefix = parse_s3_uri(self.url)
            key = f"{prefix.rstrip('/')}/{task_id}/{uuid.uuid4().hex}.json".lstrip("/")  # a lost attempt's: an orphan
            self.objects().client.put_object(Bucket=bucket, Key=key, Body=blob, ContentType="application/json")
            stored = orjson.dumps({"uri": f"s3://{bucket}/{key}"})
        keys = [self.registry.keys.task(task_id), self.registry.keys.checkpoint(task_id)]
        if not self._save(keys=keys, args=[token, stored, self.ttl_s, time.time()]):
            raise TaskError("this attempt no longer owns the task (its lease lapsed): its checkpoint was not saved")
        return len(blob)

    def load(self, task_id: str) -> Any:
        """The task's last checkpoint, or None."""
        raw = self.registry.client.get(self.registry.keys.checkpoint(task_id))
        if raw is None:
            return None
        saved = orjson.loads(raw)
        if "uri" in saved:
            bucket, key = parse_s3_uri(saved["uri"])
            return orjson.loads(self.objects().read(bucket, key))
        return saved["state"]
