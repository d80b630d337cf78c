"""S3 destination: each record becomes an object.

URL: ``s3://bucket/prefix`` (or ``s3://bucket``), on the fleet's object store (``s3`` settings). No options.

A record is written to ``<prefix>/<task id>.json`` (``Content-Type: application/json``), with its headers as
object metadata (``x-amz-meta-condition``, ``x-amz-meta-function``). A later record of the same task (after a
retry) replaces the earlier one, and writing a record twice is harmless. An answer such as AccessDenied or
NoSuchBucket parks the record with the reason; connection errors, timeouts, 5xx and throttling are retried.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpufleet.aws import AwsClient, permanent, transient_errors
from gpufleet.destinations.base import OutRecord, Refusal
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
                client.put_object(Bucket=self.bucket, Key=self.key(r.key), Body=r.value,
                                  ContentType="application/json", Metadata=r.headers)  # fmt: skip
            except transient_errors() as exc:
                if not permanent(exc):
                    raise DeliveryError(f"s3://{self.bucket}/{self.prefix}: {exc}") from exc
                refused.append(Refusal(i, str(exc)))
        return refused

    def close(self) -> None:
        self._s3.close()
