"""S3 destination: each record becomes an object.

URL: ``s3://bucket/prefix`` (or ``s3://bucket``), on the fleet's object store (``s3`` settings). No options.

A record is written to ``<prefix>/<task id>.json`` (``Content-Type: application/json``), with its headers as
object metadata (``x-amz-meta-condition``, ``x-amz-meta-function``). A later record of the same task (after a
retry) replaces the earlier one, and writing a record twice is harmless. An answer such as AccessDenied or
NoSuchBucket parks the record with the reason; connection errors, timeouts, 5xx and throttling are retried.

Read back (:class:`S3Reader`) by listing the prefix every second: a record shows once it is written, and again if it
is written again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from gpufleet.aws import AwsClient, permanent, transient_errors
from gpufleet.destinations.base import Landed, OutRecord, Refusal
from gpufleet.errors import DeliveryError
from gpufleet.urls import Endpoint, Options

if TYPE_CHECKING:
    from gpufleet.settings import FleetSettings


class S3Destination:
    OPTIONS = Options

    def __init__(self, endpoint: Endpoint, settings: FleetSettings) -> None:
        self.bucket = endpoint.hosts or ""
        self.prefix = endpoint.path.strip("/")
        self._s3 = AwsClient("s3", settings)

    def key(self, task_id: str) -> str:
        return f"{self.prefix}/{task_id}.json" if self.prefix else f"{task_id}.json"

    def deliver(self, records: list[OutRecord]) -> list[Refusal]:
        client = self._s3.get()
        refused: list[Refusal] = []
        for i, r in enumerate(records):
            try:
                client.put_object(
                    Bucket=self.bucket,
                    Key=self.key(r.key),
                    Body=r.value,
                    ContentType="application/json",
                    Metadata=r.headers,
                )
            except transient_errors() as exc:
                if not permanent(exc):
                    raise DeliveryError(f"s3://{self.bucket}/{self.prefix}: {exc}") from exc
                refused.append(Refusal(i, str(exc)))
        return refused

    def close(self) -> None:
        self._s3.close()


class S3Reader:
    """The prefix's objects, listed again every ``POLL_S``: reading them takes nothing from anyone. A record
    written again (a retried task's) shows again."""

    system = "S3"
    history = True
    POLL_S = 1.0

    def __init__(self, endpoint: Endpoint, settings: FleetSettings) -> None:
        self._dest = S3Destination(endpoint, settings)
        self.where = f"s3://{self._dest.bucket}/{self._dest.prefix}"
        self._seen: dict[str, str] | None = None  # key -> eTag of every object listed so far

    def follow(self, stop: threading.Event, from_beginning: bool, on_ready: Callable[[], None]) -> Iterator[Landed]:
        client, prefix = self._dest._s3.get(), f"{self._dest.prefix}/" if self._dest.prefix else ""
        first = self._seen is None
        while not stop.is_set():
            listed: dict[str, tuple[str, float]] = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self._dest.bucket, Prefix=prefix):
                listed |= {o["Key"]: (o["ETag"], o["LastModified"].timestamp()) for o in page.get("Contents", [])}
            seen = (
                self._seen
                if self._seen is not None
                else ({} if from_beginning else {k: e for k, (e, _) in listed.items()})
            )
            new = sorted((at, key) for key, (etag, at) in listed.items() if seen.get(key) != etag)
            self._seen = {**seen, **{k: e for k, (e, _) in listed.items()}}
            if first:
                first = False
                on_ready()
            for at, key in new:
                got = client.get_object(Bucket=self._dest.bucket, Key=key)
                task_id = key.removeprefix(prefix).removesuffix(".json")
                yield Landed(self.where, key, at, task_id, dict(got.get("Metadata", {})), got["Body"].read())
            stop.wait(self.POLL_S)

    def close(self) -> None:
        self._dest.close()
