"""Object stores and AWS: the object events, the S3 client and the object-key rules, and the boto3 clients the
S3, SQS and SNS triggers and destinations share. The triggers and the worker import this module, never each other.

Object-storage events and what a handler does with them: download to a scratch directory, upload outputs.

An :class:`ObjectEvent` is one object that was created (or removed) in a bucket, whatever told us: an S3 event
record from SQS, Kafka or a webhook, or a listing of the bucket. Its task id comes from the object's identity
(bucket, key, versionId or eTag), so the two events some servers send for one multipart upload run once.

What the S3, SQS and SNS destinations share (:class:`AwsClient`): their boto3 client, and which of botocore's errors
may pass.

Clients use the fleet's ``s3`` settings (endpoint, region, credentials): ``s3.endpoint_url`` for S3,
``s3.sqs_endpoint_url`` for SQS and SNS (moto and LocalStack serve both on one endpoint; on AWS both are unset).
botocore retries twice inside a call; past that the dispatcher retries the batch with its own backoff.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydantic import BaseModel, ConfigDict

from gpufleet.errors import DeliveryError, PermanentTaskError
from gpufleet.intake.ids import object_task_id

if TYPE_CHECKING:
    from gpufleet.settings import FleetSettings, S3Settings

CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
MAX_KEY_BYTES = 1024  # S3, MinIO and Ceph refuse longer object keys


class ObjectEvent(BaseModel):
    """One object event, decoded. Declare ``payload=ObjectEvent`` on a function to receive it typed."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    bucket: str
    key: str  # decoded: "photos/a b+1.jpg", never "photos/a+b%2B1.jpg"
    event_type: str  # without the "s3:" prefix: ObjectCreated:Put, ObjectRemoved:Delete, ObjectCreated:Listed
    size: int | None = None
    etag: str | None = None  # without quotes
    version_id: str | None = None
    sequencer: str | None = None
    event_time: str | None = None
    content_type: str | None = None
    source: str = "aws:s3"  # eventSource: aws:s3, minio:s3, ceph:s3; "poll" for a bucket listing
    region: str | None = None

    @property
    def family(self) -> str:
        """``ObjectCreated`` or ``ObjectRemoved``: the part of the event type that says what happened."""
        return self.event_type.split(":", 1)[0]

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def task_id(self, function: str) -> str:
        """The object's identity, not the message's: Put and CompleteMultipartUpload of one upload share it. Each
        function that gets the object has a task of its own."""
        version = self.version_id or self.etag or self.sequencer or self.event_time or ""
        return object_task_id(function, self.family, self.bucket, self.key, version)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3://bucket/prefix URL")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} has no bucket")
    return bucket, prefix


def key_parts(key: str) -> tuple[str, ...]:
    """The relative path that object ``key`` is stored at below a download directory, as plain names.

    Backslashes count as separators, ``.``, ``..`` and empty segments drop out and control characters become
    ``_``, so no key names anything outside the directory. Symlinks are the writer's concern (worker/scratch.py).
    """
    parts = tuple(p for p in CONTROL_CHARS.sub("_", key.replace("\\", "/")).split("/") if p not in ("", ".", ".."))
    return parts or ("object",)


class ObjectStore:
    """A boto3 S3 client built from the fleet's ``s3`` settings, created on first use (after fork)."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client("s3", self.settings)
        return self._client

    def head(self, bucket: str, key: str) -> dict[str, Any]:
        response: dict[str, Any] = self.client.head_object(Bucket=bucket, Key=key)
        return response

    def download(
        self,
        bucket: str,
        key: str,
        open_dest: Callable[[], AbstractContextManager[BinaryIO]],
        version_id: str | None = None,
    ) -> dict[str, Any]:
        """Stream the object (never whole in memory) into the file ``open_dest()`` opens, which is called only
        once the object is found, so a missing object leaves nothing behind. Returns GetObject's metadata."""
        extra = {"VersionId": version_id} if version_id else {}
        response = self.client.get_object(Bucket=bucket, Key=key, **extra)
        body = response.pop("Body")
        try:
            with open_dest() as out:
                shutil.copyfileobj(body, out, length=1024 * 1024)
        finally:
            body.close()
        return dict(response)

    def read(
        self, bucket: str, key: str, start: int | None = None, end: int | None = None, limit: int | None = None
    ) -> bytes:
        """The object's bytes, or those of ``[start, end)`` (an HTTP range request), in memory.

        Raises:
            PermanentTaskError: ``ReadTooLarge``, more than ``limit`` bytes (found from the answer's length, before
                reading any).
        """
        extra = {}
        if start is not None or end is not None:
            extra["Range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"
        response = self.client.get_object(Bucket=bucket, Key=key, **extra)
        body = response["Body"]
        too_large = PermanentTaskError(
            "ReadTooLarge", f"s3://{bucket}/{key}: more than {limit} bytes; read a range, or download the object"
        )
        try:
            if limit is not None and int(response.get("ContentLength") or 0) > limit:
                raise too_large  # nothing read
            data = bytes(body.read() if limit is None else body.read(limit + 1))
            if limit is not None and len(data) > limit:
                raise too_large
            return data
        finally:
            body.close()

    def upload(self, path: Path, bucket: str, key: str, content_type: str | None = None) -> str:
        extra = {"ContentType": content_type} if content_type else None
        self.client.upload_file(str(path), bucket, key, ExtraArgs=extra)
        return f"s3://{bucket}/{key}"


def make_client(service: str, settings: S3Settings, max_attempts: int = 5) -> Any:
    """A boto3 client for ``s3``, ``sqs`` or ``sns``: the configured endpoint (MinIO, Ceph, SeaweedFS, moto) or
    AWS. SNS uses ``sqs_endpoint_url``, as moto and LocalStack serve both on one endpoint."""
    import boto3
    from botocore.config import Config

    endpoint = settings.endpoint_url if service == "s3" else settings.sqs_endpoint_url
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        s3={"addressing_style": settings.addressing_style},
        connect_timeout=5,
        read_timeout=60,
    )
    return boto3.session.Session().client(
        service,
        endpoint_url=endpoint,
        region_name=settings.region,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        config=config,
    )


# Error codes an AWS-compatible service answers with a 4xx that still mean "try again later".
# fmt: skip below: a list of codes reads better packed than one per line.
RETRYABLE_CODES = frozenset({"Throttling", "ThrottlingException", "RequestThrottled", "SlowDown", "RequestTimeout",
                             "RequestTimeoutException", "KMSThrottlingException", "ServiceUnavailable"})  # fmt: skip


def permanent(exc: Exception) -> bool:
    """True when the service refused the request for good (a 4xx such as AccessDenied or NoSuchBucket); False for
    what may pass (connection errors, timeouts, 5xx, throttling)."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
    return 400 <= status < 500 and status not in (408, 429) and error.get("Code") not in RETRYABLE_CODES


def transient_errors() -> tuple[type[Exception], ...]:
    """Every botocore error: :func:`permanent` tells the few that are not transient apart."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


class AwsClient:
    """One boto3 client per destination, made on first use (boto3 clients are thread-safe once made)."""

    def __init__(self, service: str, settings: FleetSettings) -> None:
        self._service, self._settings = service, settings.s3
        self._client: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    self._client = make_client(self._service, self._settings, max_attempts=2)
                except Exception as exc:
                    raise DeliveryError(f"cannot make a {self._service} client: {exc}") from exc
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
