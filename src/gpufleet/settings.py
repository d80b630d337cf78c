"""The fleet's settings as models: what ``config/fleet.yaml`` may hold, each key validated with the fix for a bad
value. :mod:`gpufleet.config` reads the files and the environment into them."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpufleet.credentials import HOW_TO_GENERATE, is_loopback, redact_url, secret_problem
from gpufleet.errors import ConfigError
from gpufleet.functions import ALIAS_RE, POOL_RE, weights_problem
from gpufleet.registry.connection import is_sentinel, parse_sentinel
from gpufleet.scheduling.gpumodels import ANY, check_model


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisSettings(_Model):
    """Redis is the Celery broker and the task registry: one server (``redis://``, ``rediss://``) or a Sentinel-
    managed master (``sentinel://h1:26379,h2:26379,h3:26379/0?master=mymaster``, see gpufleet.registry.connection)."""

    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "gpufleet"
    # Redis replicates asynchronously: a failover may lose the last writes of the old master. With wait_replicas N,
    # a source is acknowledged (a Kafka offset committed, a 202 answered) only once its tasks reached N replicas
    # (WAIT, at most wait_timeout_ms; fewer is a retriable error). 0: acknowledged once the master has them.
    wait_replicas: int = Field(0, ge=0, le=16)
    wait_timeout_ms: int = Field(1000, ge=1, le=60_000)

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if is_sentinel(v):
            parse_sentinel(v)  # ValueError says what is wrong
        elif not re.match(r"^rediss?://", v):
            raise ValueError(f"{redact_url(v)!r} is not a redis://, rediss:// or sentinel:// URL")
        return v


class KafkaSettings(_Model):
    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "gpufleet"
    # tansu and small clusters take ~23 s to form a group with larger values (see DESIGN.md).
    session_timeout_ms: int = Field(6000, ge=1000, le=300_000)
    heartbeat_interval_ms: int = Field(1000, ge=100)
    fetch_max_wait_ms: int = Field(50, ge=0, le=10_000)
    request_timeout_ms: int = Field(30_000, ge=1000)
    # The largest request the producer sends; Kafka brokers accept 1 MiB by default (message.max.bytes).
    max_request_size: int = Field(1_048_576, ge=65_536)


class WorkerSettings(_Model):
    # CPU slots that stand in for GPUs on a machine without one, so every path runs on a laptop and in CI.
    virtual_gpus: int = Field(0, ge=0, le=64)
    # The GPU series the virtual GPUs stand for (H100, A10G...), so that they serve the functions that ask for it: a
    # host of a test fleet can play an H100 host. Real GPUs report their own, from NVML.
    gpu_model: str | None = None
    pools: tuple[str, ...] = ("default",)
    hostname: str = Field(default_factory=socket.gethostname)
    # A running task holds a lease its worker renews every lease_s / 3; a lease that lapses means its worker died.
    lease_s: float = Field(30.0, gt=0.5, le=3600)
    # After a hard timeout, how long the worker waits for the handler before killing its process.
    kill_grace_s: float = Field(10.0, ge=0)
    # A running task asked to cancel sees ctx.cancelled; if it has not returned after this, its process is killed.
    cancel_grace_s: float = Field(10.0, ge=0)
    restart_backoff_s: float = Field(1.0, ge=0)
    # A function whose setup() failed in a worker is not served there (its tasks go back to their queue); a task that
    # arrives this long after the last try runs setup() again first.
    setup_retry_s: float = Field(30.0, gt=0)
    # Warm models (gpufleet.worker.warmup): how many functions' setup() a pool process keeps loaded at once (None:
    # every one it serves, set up at boot), the least recently used unloaded first; and how long a task waits for a
    # worker that has its function loaded before any worker loads it.
    warm_functions: int | None = Field(None, ge=1)
    cold_wait_s: float = Field(5.0, ge=0, le=3600)
    # On stop, running tasks get this long to finish (warm shutdown) before their processes are killed; a killed
    # task is re-run elsewhere. Give containers a stop grace period longer than this.
    shutdown_grace_s: float = Field(30.0, ge=0)
    # Celery task events, worker heartbeats and remote control: Flower, `celery events` and `celery inspect` see the
    # workers and their tasks.
    task_events: bool = True
    # Each task gets a fresh directory below this one (downloads, outputs); it is removed when the task ends.
    scratch_dir: Path | None = None  # default: <system temp>/gpufleet-scratch-<uid>, created 0700
    # GPUs per worker host, for the scaling figure (see gpufleet.scheduling.scaling) of a pool and model that no live
    # host reports yet: scaling from zero. Live hosts report their own.
    slots_per_worker: int = Field(1, ge=1, le=64)
    # The file of a fake NVML (gpufleet.dev.fakenvml) to read instead of the driver's: GPUs, their memory and faults
    # as a test or a rehearsal writes them, on a machine without a GPU.
    fake_nvml: Path | None = None
    # What one GPU-hour of each model costs you (H100: 2.49): each task's record and status then carry its cost, and
    # `gpufleet usage` adds them up. A model not listed has no cost.
    gpu_hour_price: dict[str, float] = Field(default_factory=dict)
    # A GPU cordoned for its health (an XID, ECC errors, fallen off the bus) is uncordoned once it has looked healthy
    # this long; None: only an operator uncordons it (gpufleet gpus uncordon).
    auto_uncordon_s: float | None = Field(None, gt=0)
    # A task that needs several GPUs and finds some busy lets one-GPU tasks backfill them this long; then it reserves
    # them: they take no new task until it has them all (see gpufleet.worker.holds).
    reserve_after_s: float = Field(30.0, ge=0, le=3600)
    # How a spot host learns its GPUs are being reclaimed (gpufleet.worker.preempt): "sigterm", a file:// path that
    # appears, or an http(s):// URL that answers 200 (a cloud's metadata endpoint); None: no notice is watched for.
    preempt_notice: str | None = Field(None, pattern=r"^(sigterm|file:///.+|https?://.+)$")
    # Where checkpoints over 1 MiB go (ctx.checkpoint): an s3://bucket/prefix; None: such a checkpoint fails the task.
    checkpoint_url: str | None = Field(None, pattern=r"^s3://[^/]+(/.*)?$")

    @field_validator("pools")
    @classmethod
    def _pools(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v) or not all(POOL_RE.fullmatch(p) for p in v):
            raise ValueError(f"{list(v)}: use one or more distinct names of lowercase letters, digits, '-' or '_'")
        return v

    @field_validator("gpu_hour_price")
    @classmethod
    def _prices(cls, v: dict[str, float]) -> dict[str, float]:
        out = {}
        for model, price in v.items():
            if not price >= 0:
                raise ValueError(f"{model}: {price}: a price is a number >= 0")
            try:  # keyed by series, as the GPUs report theirs: "NVIDIA H100 80GB HBM3" prices H100
                out[check_model(model, "worker.gpu_hour_price") if model != "virtual" else model] = price
            except ConfigError as exc:
                raise ValueError(f"no GPU series in {model!r} ({exc.fix})") from None
        return out

    @field_validator("gpu_model")
    @classmethod
    def _gpu_model(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            series = check_model(v, "worker.gpu_model")
        except ConfigError as exc:
            raise ValueError(f"no GPU series in {v!r} ({exc.fix})") from None
        if series == ANY:
            raise ValueError("a GPU is of one series: name it (H100, A10G...), or leave gpu_model out")
        return series


class S3Settings(_Model):
    """The object store (and SQS) that object triggers and the handlers' download/upload helpers use.

    ``endpoint_url`` null means AWS; set it for MinIO, Ceph RGW or SeaweedFS. Credentials null means boto3's
    default chain (environment, profile, instance role); use ``GPUFLEET_S3__SECRET_ACCESS_KEY`` for secrets.
    """

    endpoint_url: str | None = None
    sqs_endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    addressing_style: Literal["auto", "path", "virtual"] = "path"


class DefaultsSettings(_Model):
    on_success: str = "kafka:///gpufleet.success"
    on_failure: str = "kafka:///gpufleet.failure"
    dead_letter: str = "kafka:///gpufleet.dead-letter"
    # The largest event accepted (Lambda's asynchronous limit). A message that is larger is dead-lettered.
    max_payload_bytes: int = Field(262_144, ge=1)
    # Callback records and dead letters are kept within this: an oversized requestPayload (then responsePayload)
    # is replaced by a marker, an oversized dead letter is cut with headers that say so. It must stay below
    # kafka.max_request_size, so that no accepted event can make a record its destination refuses.
    max_record_bytes: int = Field(524_288, ge=16_384)
    retention_s: int = Field(7 * 86_400, ge=60)
    # Redis re-delivers a message still unacknowledged after this. A copy of a running task is dropped (the
    # registry says RUNNING, lease alive), so it never runs twice, but keep it above the longest task (24 h) so
    # workers do not waste time on such copies. Lost workers are found through leases instead, in seconds.
    visibility_timeout_s: float = Field(90_000, gt=0)
    # Aging: a waiting task moves up one priority level each time it has waited this long at its level, so a task of
    # priority p runs within (9 - p) x priority_aging_s plus the wait of the priority-9 tasks queued before it.
    priority_aging_s: float = Field(60.0, gt=0)


class DispatcherSettings(_Model):
    batch_max: int = Field(200, ge=1, le=10_000)
    retry_backoff_s: float = Field(0.5, gt=0)
    retry_backoff_max_s: float = Field(30.0, gt=0)
    # A dispatcher that died (killed mid-delivery) hands over its destinations' flows after this long; a dispatcher
    # on the same host takes them at once.
    claim_idle_s: float = Field(30.0, gt=0)
    # Each destination on its own (see gpufleet.delivery.flows): after this many failures in a row its breaker opens,
    # and it is sent one record at a time until one passes.
    breaker_failures: int = Field(5, ge=1)
    # A record not delivered this long after its task finished is parked with the last error (re-send it with
    # `gpufleet parked resend`); likewise after max_delivery_attempts tries, if set.
    max_delivery_age_s: float = Field(86_400.0, gt=0)
    max_delivery_attempts: int | None = Field(None, ge=1)


class ApiSettings(_Model):
    """The HTTP control plane (``gpufleet api``). Every route but ``/healthz`` needs ``Authorization: Bearer``."""

    enabled: bool = False  # `gpufleet run` starts the API role
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65_535)
    # Required when enabled, and strong (32+ characters, generated: `gpufleet token`). No default is shipped.
    token: str | None = None
    # Optional, as strong: a read-only token for monitoring, good for GET /metrics and GET /v1/scaling only (a
    # Prometheus or KEDA that holds it cannot invoke, cancel or read tasks).
    monitoring_token: str | None = None
    # A laptop: a weak api.token (and webhook secrets) are allowed, but only while host is a loopback address.
    dev: bool = False
    max_page: int = Field(500, ge=1, le=10_000)
    # Requests served at once; more are answered 503 at once. A connection still sending its request head is not
    # one: it has header_timeout_s to finish it (else 408), and one client address holds at most
    # max_connections_per_client connections (behind a reverse proxy, every client has the proxy's address: raise
    # it to what the proxy opens, and cap clients there).
    max_connections: int = Field(200, ge=1, le=100_000)
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    max_connections_per_client: int = Field(64, ge=1, le=100_000)
    # A request body must arrive within this, or the request is answered 408 and its connection closed.
    body_timeout_s: float = Field(30.0, gt=0, le=3600)

    @property
    def weak_secrets_allowed(self) -> bool:
        return self.dev and is_loopback(self.host)

    def require_token(self, where: str) -> str:
        """The token, for a process that serves the API (only that one needs it: a GPU host does not).

        Raises:
            ConfigError: no token is set.
        """
        if self.token is None:
            fix = "export GPUFLEET_API__TOKEN=$(gpufleet token), or set api.enabled: false"
            raise ConfigError("is required to serve the API", file=where, key="api.token", fix=fix)
        return self.token


class LoggingSettings(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: readable lines on a terminal (structlog's console renderer), JSON when stderr is a file or a pipe.
    format: Literal["auto", "json", "console"] = "auto"


RECORD_HEADROOM = 16_384  # key, headers and batch framing around a record's value


class FleetSettings(_Model):
    redis: RedisSettings = RedisSettings()
    kafka: KafkaSettings = KafkaSettings()
    s3: S3Settings = S3Settings()
    worker: WorkerSettings = WorkerSettings()
    defaults: DefaultsSettings = DefaultsSettings()
    dispatcher: DispatcherSettings = DispatcherSettings()
    api: ApiSettings = ApiSettings()
    logging: LoggingSettings = LoggingSettings()
    functions: tuple[Path, ...] = (Path("../workers"),)
    triggers: tuple[Path, ...] = (Path("../triggers"),)
    # Function -> alias -> {version: weight}, e.g. {embed: {prod: {"3": 0.9, "4": 0.1}}} (see
    # gpufleet.scheduling.aliases).
    aliases: dict[str, dict[str, dict[str, float]]] = {}

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
        for fn, aliases in v.items():
            for alias, weights in aliases.items():
                if not ALIAS_RE.fullmatch(alias):
                    raise ValueError(f"{fn}: alias {alias!r}: a lowercase letter, then letters, digits, '_' or '-'")
                problem = weights_problem(weights)
                if problem:
                    raise ValueError(f"{fn}: alias {alias!r}: {problem}")
        return v

    @model_validator(mode="after")
    def _records_fit(self) -> FleetSettings:
        d, room = self.defaults, self.kafka.max_request_size - RECORD_HEADROOM
        if d.max_record_bytes > room:
            raise ValueError(
                f"defaults.max_record_bytes ({d.max_record_bytes}) must be at most kafka.max_request_size minus "
                f"{RECORD_HEADROOM} bytes for keys and headers ({room}): lower it, or raise kafka.max_request_size"
            )
        if d.max_payload_bytes > d.max_record_bytes:
            raise ValueError(
                f"defaults.max_payload_bytes ({d.max_payload_bytes}) must be at most defaults.max_record_bytes "
                f"({d.max_record_bytes}), so that an accepted event always fits its dead letter"
            )
        return self

    @model_validator(mode="after")
    def _api_token(self) -> FleetSettings:
        """A token that is set must be strong, wherever it is loaded; only the API's process needs one."""
        api = self.api
        if api.dev and not is_loopback(api.host):
            raise ValueError(f"api.dev is only for a loopback host, and api.host is {api.host!r}: set api.dev: false")
        for key in ("token", "monitoring_token"):
            value = getattr(api, key)
            problem = None if value is None else secret_problem(value, weak_allowed=api.weak_secrets_allowed)
            if problem is not None:
                raise ValueError(
                    f"api.{key} cannot be used: {problem}. To fix: {HOW_TO_GENERATE}; a weak token is "
                    "only allowed with api.dev: true on a loopback api.host"
                )
        if api.monitoring_token is not None and api.monitoring_token == api.token:
            raise ValueError("api.monitoring_token is api.token: give monitoring a token of its own (gpufleet token)")
        return self
