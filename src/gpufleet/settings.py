"""Fleet settings: ``config/fleet.yaml``, ``triggers/*.yaml`` and environment overrides, validated at load.

This is the only module that reads the environment. Rules:

- Unknown keys are errors, with a "did you mean" hint.
- Every error names the file, the key and the fix.
- ``GPUFLEET_<SECTION>__<KEY>=value`` overrides a setting of ``fleet.yaml``. Example:
  ``GPUFLEET_REDIS__URL=redis://redis:6379/0``. Values are taken as they are (a secret full of ``#``, ``:`` or
  digits stays a string); only list settings (``worker.pools``) are read as YAML: ``[gpu-a, gpu-b]``.
- No message shows the value of a secret setting (:func:`gpufleet.credentials.is_secret_name`) or a URL's
  password.
- ``GPUFLEET_CONFIG`` names the fleet file when the CLI gets no ``--config``.
- Relative paths in ``fleet.yaml`` are relative to the folder that holds it.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gpufleet.credentials import HOW_TO_GENERATE, hidden, is_loopback, is_secret_name, redact_url, secret_problem
from gpufleet.errors import ConfigError, did_you_mean
from gpufleet.functions import Function, load_functions
from gpufleet.gpumodels import ANY, check_model
from gpufleet.placement import POOL_RE
from gpufleet.redisconn import is_sentinel, parse_sentinel
from gpufleet.triggers.options import TriggerSettings

ENV_PREFIX = "GPUFLEET_"
# Not settings: read by the CLI and the roles.
RESERVED_ENV = {"GPUFLEET_CONFIG", "GPUFLEET_PARENT_PID", "GPUFLEET_DEV_DIR"}
DEFAULT_CONFIG = Path("config/fleet.yaml")
M = TypeVar("M", bound=BaseModel)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisSettings(_Model):
    """Redis is the Celery broker and the task registry: one server (``redis://``, ``rediss://``) or a Sentinel-
    managed master (``sentinel://h1:26379,h2:26379,h3:26379/0?master=mymaster``, see gpufleet.redisconn)."""

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
    # On stop, running tasks get this long to finish (warm shutdown) before their processes are killed; a killed
    # task is re-run elsewhere. Give containers a stop grace period longer than this.
    shutdown_grace_s: float = Field(30.0, ge=0)
    # Celery task events, worker heartbeats and remote control: Flower, `celery events` and `celery inspect` see the
    # workers and their tasks.
    task_events: bool = True
    # Each task gets a fresh directory below this one (downloads, outputs); it is removed when the task ends.
    scratch_dir: Path | None = None  # default: <system temp>/gpufleet-scratch-<uid>, created 0700
    # GPUs per worker host, for the scaling figure (see gpufleet.scaling) of a pool and model that no live host
    # reports yet: scaling from zero. Live hosts report their own.
    slots_per_worker: int = Field(1, ge=1, le=64)

    @field_validator("pools")
    @classmethod
    def _pools(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v) or not all(POOL_RE.fullmatch(p) for p in v):
            raise ValueError(f"{list(v)}: use one or more distinct names of lowercase letters, digits, '-' or '_'")
        return v

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
    # Each destination on its own (see gpufleet.flows): after this many failures in a row its breaker opens, and it
    # is sent one record at a time until one passes.
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
    # Function -> alias -> {version: weight}, e.g. {embed: {prod: {"3": 0.9, "4": 0.1}}} (see gpufleet.aliases).
    aliases: dict[str, dict[str, dict[str, float]]] = {}

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
        from gpufleet.aliases import ALIAS_RE, weights_problem

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
                raise ValueError(f"api.{key} cannot be used: {problem}. To fix: {HOW_TO_GENERATE}; a weak token is "
                                 "only allowed with api.dev: true on a loopback api.host")  # fmt: skip
        if api.monitoring_token is not None and api.monitoring_token == api.token:
            raise ValueError("api.monitoring_token is api.token: give monitoring a token of its own (gpufleet token)")
        return self


@dataclass(frozen=True)
class Fleet:
    """Everything loaded and cross-checked: settings, functions and triggers."""

    settings: FleetSettings
    functions: dict[str, Function]
    triggers: dict[str, TriggerSettings]
    config_file: Path


def load_fleet(config_file: Path | None = None, env: Mapping[str, str] | None = None, *, secrets: bool = True) -> Fleet:
    """Load and validate the fleet: settings, environment overrides, functions and triggers.

    ``secrets=False`` leaves out the checks of the secrets that triggers and destinations name (``*_env``): a control
    command (status, cancel, invoke...) reads Redis and never signs a record nor checks a webhook, so it must not
    need the delivery role's secrets. Everything else is validated as for a role.

    Raises:
        ConfigError: anything invalid, naming the file, the key and the fix.
    """
    env = os.environ if env is None else env
    secret_env = env if secrets else None
    path = config_file or Path(env.get(f"{ENV_PREFIX}CONFIG", str(DEFAULT_CONFIG)))
    if path == DEFAULT_CONFIG and not path.exists():
        raise ConfigError(f"no fleet here ({Path.cwd()})", file=str(path), fix="`gpufleet init` writes a starter "
                          "project in this folder; or pass --config FILE, or set GPUFLEET_CONFIG")  # fmt: skip
    raw, from_env = _apply_env(_read_yaml(path), env)
    settings = _validate(FleetSettings, raw, str(path), from_env)
    base = path.resolve().parent
    settings = settings.model_copy(
        update={
            "functions": tuple((base / p).resolve() for p in settings.functions),
            "triggers": tuple((base / p).resolve() for p in settings.triggers),
        }
    )
    functions = load_functions(settings.functions)
    unknown = sorted(set(settings.aliases) - set(functions))
    if unknown:
        raise ConfigError(f"aliases for functions this fleet does not serve: {unknown}", file=str(path), key="aliases",
                          fix=f"use one of {sorted(functions)}")  # fmt: skip
    triggers = load_triggers(settings.triggers, functions, secret_env, settings.defaults.max_record_bytes,
                             settings.api.weak_secrets_allowed)  # fmt: skip
    from gpufleet.destinations import parse_destination  # local: destinations import settings types

    for key in ("on_success", "on_failure", "dead_letter"):
        parse_destination(getattr(settings.defaults, key), where=str(path), key=f"defaults.{key}", env=secret_env)
    for fn in functions.values():
        for key in ("on_success", "on_failure"):
            url = getattr(fn, key)
            if url:
                parse_destination(url, where=fn.source_file, key=f"{fn.name}.{key}", env=secret_env)
    from gpufleet.triggers import served_by

    hooks = [t.name for t in triggers.values() if t.enabled and served_by(t.scheme) == "api"]
    if hooks and not settings.api.enabled:
        raise ConfigError(f"webhook trigger(s) {hooks} are served by the api role, which is off", file=str(path),
                          key="api.enabled", fix="set api.enabled: true (and api.token)")  # fmt: skip
    return Fleet(settings=settings, functions=functions, triggers=triggers, config_file=path.resolve())


def load_triggers(folders: tuple[Path, ...], functions: Mapping[str, Function], env: Mapping[str, str] | None = None,
                  max_record_bytes: int | None = None, weak_secrets_allowed: bool = False,
                  ) -> dict[str, TriggerSettings]:  # fmt: skip
    """Load every ``*.yaml`` trigger file in the folders: each against its scheme's model (declared by its trigger
    class), then its source, function and destinations; with ``env``, the secrets they name too (left unresolved
    without it)."""
    from gpufleet.destinations import parse_destination
    from gpufleet.triggers import check_keys, parse_source, settings_model

    triggers: dict[str, TriggerSettings] = {}
    for folder in folders:
        if not folder.is_dir():
            continue  # a fleet that only serves the HTTP API needs no trigger folder
        for file in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            where = str(file)
            raw = _read_yaml(file)
            raw.setdefault("name", file.stem)
            source = raw.get("source")
            if not isinstance(source, str):
                raise ConfigError("is required: the URL of the trigger's source" if source is None else
                                  "must be a URL", file=where, key="source", fix="kafka:///topic, sqs:///queue, "
                                  "webhook:///path, s3://bucket/prefix or amqp://host/vhost?queue=NAME")  # fmt: skip
            scheme = parse_source(source, where=where, key="source", env=env).scheme
            check_keys(scheme, raw, raw.get("format"), where=where)
            trigger = _validate(settings_model(scheme, raw.get("format")), raw, where)
            if env is not None:
                trigger = trigger.resolved(env, where=where, weak_secrets_allowed=weak_secrets_allowed)
            if trigger.name in triggers:
                raise ConfigError(f"trigger name {trigger.name!r} is used twice", file=where, key="name")
            if max_record_bytes and (trigger.max_payload_bytes or 0) > max_record_bytes:
                raise ConfigError(f"{trigger.max_payload_bytes} is more than defaults.max_record_bytes "
                                  f"({max_record_bytes}): an accepted message must fit its dead letter",
                                  file=where, key="max_payload_bytes",
                                  fix="lower it, or raise defaults.max_record_bytes")  # fmt: skip
            if trigger.function is not None and trigger.function not in functions:
                raise ConfigError(
                    f"unknown function {trigger.function!r}",
                    file=where,
                    key="function",
                    fix=did_you_mean(trigger.function, functions) or f"one of {sorted(functions)}",
                )
            if trigger.object_events and trigger.function is None:
                raise ConfigError("an object-event trigger needs a function", file=where, key="function",
                                  fix="name the function that gets each object event")  # fmt: skip
            for key in ("dead_letter", "on_success", "on_failure"):
                url = getattr(trigger, key)
                if url:
                    parse_destination(url, where=where, key=key, env=env)
            triggers[trigger.name] = trigger
    return triggers


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(path), fix="check the path or set --config") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {_yaml_problem(exc)}", file=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of keys", file=str(path))
    return data


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Overlay ``GPUFLEET_*`` variables; also return which keys they set ("redis.url" -> variable name)."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    sources: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if len(path) not in (1, 2) or path[0] not in FleetSettings.model_fields:
            raise ConfigError(
                "unknown setting",
                file="environment",
                key=name,
                fix=f"use {ENV_PREFIX}<SECTION>__<KEY>, SECTION one of {sorted(FleetSettings.model_fields)}",
            )
        parsed: Any = value
        if value and _structured(FleetSettings, path):
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(f"not valid YAML: {_yaml_problem(exc)}", file="environment", key=name,
                                  fix="write a list as [a, b]") from None  # fmt: skip
        sources[".".join(path)] = name
        if len(path) == 1:
            merged[path[0]] = parsed
        else:
            section = merged.setdefault(path[0], {})
            if not isinstance(section, dict):
                raise ConfigError("is not a section", file="environment", key=name)
            section[path[1]] = parsed
    return merged, sources


def _validate(model: type[M], raw: dict[str, Any], where: str, from_env: Mapping[str, str] | None = None) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if from_env and key in from_env:
            where = f"environment variable {from_env[key]}"
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, err["loc"][:-1])
            hint = did_you_mean(str(err["loc"][-1]), owner.model_fields if owner else {})
            raise ConfigError("unknown key", file=where, key=key, fix=hint or "remove it") from None
        if not err["loc"]:  # a rule across keys: the message names them (the first one first) and the fix
            message = err["msg"].removeprefix("Value error, ")
            named = message.split(" ", 1)[0]
            if from_env and named in from_env:
                where = f"environment variable {from_env[named]}"
            raise ConfigError(message, file=where) from None
        if err["type"] == "missing":
            raise ConfigError("is required", file=where, key=key, fix="add it") from None
        shown = _shown(model, err["loc"], err.get("input"))
        raise ConfigError(err["msg"], file=where, key=key, fix=f"got {shown}") from None


def _shown(model: type[BaseModel], loc: tuple[int | str, ...], value: Any) -> str:
    """A rejected value as an error message may show it: never a secret, nor a section that may hold one."""
    path = [str(part) for part in loc]
    annotation = _annotation_at(model, path)
    if is_secret_name(path[-1]) or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return hidden(value)
    if isinstance(value, dict | list | tuple):
        return f"a {type(value).__name__} of {len(value)} items"
    shown = repr(redact_url(value) if isinstance(value, str) else value)
    return shown if len(shown) <= 200 else f"{shown[:200]}... ({len(shown)} characters)"


def _annotation_at(model: type[BaseModel], path: list[str]) -> Any:
    """The type of the setting at ``path``; None for a key the model does not have (validation names it)."""
    annotation: Any = model
    for part in path:
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        info = annotation.model_fields.get(part) if is_model else None
        if info is None:
            return None
        annotation = info.annotation
    return annotation


def _structured(model: type[BaseModel], path: list[str]) -> bool:
    """Whether the setting at ``path`` is a section or a list (given in the environment as YAML)."""
    annotation = _annotation_at(model, path)
    return get_origin(annotation) in (tuple, list, dict) or (
        isinstance(annotation, type) and issubclass(annotation, BaseModel)
    )


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, without the text: YAML quotes what it could not read, and that may be a secret."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = re.sub(r"'[^']{2,}'", "'...'", str(getattr(exc, "problem", None) or type(exc).__name__))
    return where + problem


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    for part in loc:
        info = model.model_fields.get(str(part))
        annotation = info.annotation if info else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model
