"""HTTP webhook destination: each record is POSTed, signed, to a URL of yours.

URL: ``https://hooks.example.com/gpufleet/done#secret_env=HOOK_SECRET`` (or ``http://``). The query, if any, is
the receiver's and is sent as it is; gpufleet's options are in the fragment, which is never sent:

- ``secret_env`` (required): the environment variable that holds the HMAC secret (32+ characters, e.g. from
  ``gpufleet token``);
- ``timeout_s`` (10): for connecting and for the whole answer.

Each request carries the record as its body (``Content-Type: application/json``) and these headers:

- ``X-Gpufleet-Timestamp``: unix seconds when it was sent;
- ``X-Gpufleet-Signature``: ``sha256=`` + hex HMAC-SHA256 of ``<timestamp>.<task id>.<body>`` with the secret. A
  receiver recomputes it over the raw body, compares in constant time, and refuses a timestamp more than a few
  minutes old, so a captured request cannot be replayed nor its task id changed (the README shows how);
- ``X-Gpufleet-Task-Id``: the record's key, to de-duplicate on (delivery is at-least-once);
- ``X-Gpufleet-Condition`` and ``X-Gpufleet-Function``: the record's headers; ``traceparent`` (W3C trace context)
  as it is.

Outcomes: a 2xx is delivered. A timeout, a connection error, a 5xx, 408 or 429 may pass: the batch is retried with
backoff. Any other answer (4xx, or a 3xx: redirects are not followed) is kept with its status and reason (parked,
see ``gpufleet parked``) and not retried for ever. The records of a batch are sent concurrently, a few at a time,
except a task's own records, which go one after the other in the order they were written.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field

from gpufleet import __version__
from gpufleet.credentials import shared_secret_fix, sign_delivery
from gpufleet.destinations.base import OutRecord, Refusal
from gpufleet.errors import ConfigError, DeliveryError
from gpufleet.urls import Endpoint, EnvName, Options

if TYPE_CHECKING:
    from gpufleet.settings import FleetSettings

TIMESTAMP_HEADER = "X-Gpufleet-Timestamp"
SIGNATURE_HEADER = "X-Gpufleet-Signature"
CONCURRENCY = 8
TRANSIENT_STATUSES = frozenset({408, 429})


class HttpOptions(Options):
    secret_env: EnvName
    timeout_s: float = Field(10.0, gt=0, le=300)


class HttpDestination:
    OPTIONS = HttpOptions

    def __init__(self, endpoint: Endpoint, settings: FleetSettings) -> None:
        options = HttpOptions.model_validate(endpoint.options)
        # The environment is read here, not only in settings: the variable is named by a URL, and load_fleet has
        # checked that it is set.
        secret = os.environ.get(options.secret_env)
        if not secret:
            raise ConfigError(
                f"environment variable {options.secret_env} is not set",
                key="secret_env",
                fix=shared_secret_fix(options.secret_env),
            )
        self._secret = secret
        self.url = urlunsplit(urlsplit(endpoint.url)._replace(fragment=""))
        self._timeout_s = options.timeout_s
        self._client: Any = None

    def _http(self) -> Any:
        if self._client is None:
            import httpx

            limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
            self._client = httpx.Client(
                timeout=self._timeout_s,
                limits=limits,
                follow_redirects=False,
                headers={"User-Agent": f"gpufleet/{__version__}"},
            )
        return self._client

    def deliver(self, records: list[OutRecord]) -> list[Refusal]:
        # Concurrently, but a task's records one after the other, in order: a receiver gets them as they were written.
        chains: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            chains.setdefault(record.key, []).append(i)
        outcomes: list[str | None] = [None] * len(records)

        def post_chain(indexes: list[int]) -> None:
            for n, i in enumerate(indexes):
                outcome = outcomes[i] = self._post(records[i])
                if outcome is not None and outcome.startswith("retry: "):
                    for later in indexes[n + 1 :]:  # not before the one that failed: the batch goes again
                        outcomes[later] = "retry: an earlier record of this task failed"
                    return

        with ThreadPoolExecutor(min(CONCURRENCY, len(chains) or 1)) as pool:
            list(pool.map(post_chain, chains.values()))
        failed = [reason for reason in outcomes if reason is not None and reason.startswith("retry: ")]
        if failed:  # the whole batch again: receivers de-duplicate on X-Gpufleet-Task-Id
            raise DeliveryError(f"POST {self.url}: {len(failed)} of {len(records)} failed, e.g. {failed[0][7:]}")
        return [Refusal(i, reason) for i, reason in enumerate(outcomes) if reason is not None]

    def _post(self, record: OutRecord) -> str | None:
        """None when delivered; ``"retry: why"`` when it may pass later; otherwise why it never will."""
        import httpx

        stamp = str(int(time.time()))
        signature = sign_delivery(self._secret, record.key, record.value, stamp)
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: stamp,
            SIGNATURE_HEADER: signature,
            "X-Gpufleet-Task-Id": record.key,
            **{
                name if name == "traceparent" else f"X-Gpufleet-{name.title()}": value
                for name, value in record.headers.items()
            },
        }
        try:
            response = self._http().post(self.url, content=record.value, headers=headers)
        except httpx.HTTPError as exc:  # timeouts, refused or reset connections, TLS errors
            return f"retry: {type(exc).__name__}: {exc}"
        status = response.status_code
        if 200 <= status < 300:
            return None
        why = f"HTTP {status}: {response.text[:200]}"
        return f"retry: {why}" if status >= 500 or status in TRANSIENT_STATUSES else why

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
