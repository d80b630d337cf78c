"""What the S3, SQS and SNS destinations share: their boto3 client, and which of botocore's errors may pass.

Clients use the fleet's ``s3`` settings (endpoint, region, credentials): ``s3.endpoint_url`` for S3,
``s3.sqs_endpoint_url`` for SQS and SNS (moto and LocalStack serve both on one endpoint; on AWS both are unset).
botocore retries twice inside a call; past that the dispatcher retries the batch with its own backoff.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from gpufleet.errors import DeliveryError
from gpufleet.objects import make_client

if TYPE_CHECKING:
    from gpufleet.settings import FleetSettings

# Error codes an AWS-compatible service answers with a 4xx that still mean "try again later".
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
