"""The HTTP API's response shapes. They document the OpenAPI spec and check what the control plane returns."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gpufleet.delivery.parking import PARKED_ID as PARKED_ID_RE
from gpufleet.functions import VERSION_RE
from gpufleet.registry.model import State


class _Out(BaseModel):
    """Keys the control plane adds later are dropped, not a 500, until they are documented here."""

    model_config = ConfigDict(extra="ignore")


class ErrorDetail(_Out):
    code: str = Field(description="stable, machine-readable: unauthorized, task_not_found, invalid_request...")
    message: str = Field(description="for people; may change between releases")
    details: list[dict[str, Any]] | None = Field(None, description="what failed validation, for invalid_request")


class ErrorResponse(_Out):
    """Every error: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorDetail


class Health(_Out):
    status: Literal["ok"]


class Invocation(_Out):
    id: str = Field(description="the task id; poll GET /v1/tasks/{id}")
    created: bool = Field(description="false: the Idempotency-Key named a task made earlier, and nothing was queued")


class Progress(_Out):
    fraction: float
    message: str


class ShardView(_Out):
    index: int
    id: str
    state: State | None = Field(description="null once its record is gone (retention passed)")
    attempts: int
    worker: str | None
    started_at: float | None = Field(description="Unix time its latest attempt started")
    finished_at: float | None = Field(description="Unix time it finished")
    outputs: list[str] = Field([], description="the s3:// URIs it uploaded")
    error: dict[str, Any] | None = Field(None, description="once it failed (or its latest failed attempt's)")
    last_error: dict[str, Any] | None = Field(None, description="succeeded after failed attempts: the latest error")


class ShardSummary(_Out):
    total: int
    done: int = Field(description="shards in a final state")
    progress: float = Field(description="done / total")
    counts: dict[str, int] = Field(description="shards per state")
    items: list[ShardView] = Field(
        description="shards in index order, a page of them (?shards_offset=, ?shards_limit=); in a listing, none"
    )
    next_offset: int | None = Field(None, description="?shards_offset= for the next page; null on the last")


class JobOf(_Out):
    id: str = Field(description="the job this shard belongs to")
    index: int


class TaskView(_Out):
    """A task: state, attempts, progress, timestamps (ISO 8601, UTC), worker and GPU, result or error."""

    id: str
    function: str
    state: State
    attempts: int
    max_attempts: int
    priority: int = Field(description="0 (lowest) to 9 (highest), as asked for; it waits at a higher level as it ages")
    progress: Progress
    source: str | None
    worker: str | None
    gpu: str | None
    condition: str | None = Field(description="set once finished: Success, RetriesExhausted, TimedOut, Cancelled...")
    result: Any = Field(description="the handler's return value, once SUCCEEDED; null in a listing (GET the task)")
    result_bytes: int | None = Field(None, description="in a listing: the size of the result as JSON")
    error: dict[str, Any] | None = Field(
        description="errorType, errorMessage, stackTrace (not in a listing), once it failed"
    )
    last_error: dict[str, Any] | None = Field(description="the error of the latest failed attempt")
    gpu_retries: int = Field(0, description="runs again after its GPU ran out of memory or broke (oom_retries)")
    checkpoints: int = Field(0, description="states its handler saved (ctx.checkpoint); the next attempt resumes")
    checkpoint_at: str | None = Field(None, description="when the last checkpoint was saved")
    preemptions: int = Field(0, description="attempts its host's GPUs were reclaimed under; each adds to max_attempts")
    usage: dict[str, Any] | None = Field(
        None,
        description="once finished: gpu_seconds (all its runs), queue_seconds, setup_seconds (the cold start it "
        "paid), peak_gpu_memory_mb, and cost where worker.gpu_hour_price prices its GPU",
    )
    waiting_for: str | None = Field(
        None, description="QUEUED: why it waits, when a worker could not take it (no GPU with room for it now)"
    )
    cancel_requested: bool
    queue: str | None = Field(None, description="the Celery queue it waits in or ran from")
    version: str | None = Field(None, description="the version asked for (embed:4, or an alias's pick); null: any")
    pool: str | None = Field(None, description="the pool of that queue")
    overflowed: bool = Field(False, description="placed in a pool other than its function's first")
    served: bool | None = Field(None, description="while QUEUED: whether a live worker consumes its queue")
    warning: str | None = Field(None, description="why it may wait: no live worker consumes its queue")
    phase: str | None = Field(None, description="a job's step: split, shards (they run; it holds no worker) or merge")
    shards: ShardSummary | None = Field(None, description="a job's shards, once it has split")
    job: JobOf | None = Field(None, description="a shard's job")
    created_at: str | None
    queued_at: str | None
    started_at: str | None
    finished_at: str | None
    retry_at: str | None
    cancel_requested_at: str | None
    lease_until: str | None


class TaskPage(_Out):
    items: list[TaskView] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class CancelOutcome(_Out):
    id: str
    outcome: Literal["cancelled", "cancelling", "noop"] = Field(
        description="cancelled: it was queued; cancelling: it runs and was signalled; noop: it had finished"
    )
    state: State
    message: str | None = None


class RetryOutcome(_Out):
    id: str
    outcome: Literal["queued"]
    previous_state: State
    state: State


class Position(_Out):
    """Where a QUEUED task stands; ``position`` 1 is next. Null when it is not waiting in a queue."""

    id: str
    state: State
    position: int | None
    ahead: int | None
    queue: str | None
    queue_length: int | None
    retry_at: str | None = Field(None, description="set while a retry waits for its backoff")
    served: bool | None = Field(None, description="while QUEUED: whether a live worker consumes its queue")
    warning: str | None = Field(None, description="why it may wait: no live worker consumes its queue")


class GpuRequirement(_Out):
    model: str
    count: int
    pools: list[str]
    memory_gb: float | None = Field(None, description="GPU memory one task needs; null: any GPU")


class VersionInfo(_Out):
    version: str
    state: str = Field(description="ACTIVE, DEPLOYING, ERROR or INACTIVE, from the live workers")
    workers: int = Field(description="live workers that run this version and reported their setup()")
    declared: bool = Field(description="the version the code loaded here declares")
    queued: int = Field(description="tasks queued for this version alone (name:version, or an alias's pick)")
    error: str | None = Field(None, description="for ERROR: what setup() raised")


class JobInfo(_Out):
    shard: str = Field(description="the function each shard runs")
    max_shards: int
    shard_records: bool = Field(description="whether each shard sends its own record too")


class FunctionInfo(_Out):
    name: str
    version: str = Field(description="the version the serving code declares; $LATEST when it declares none")
    state: str | None = Field(
        description="that version's state: ACTIVE, DEPLOYING, ERROR or INACTIVE; null when Redis cannot be reached"
    )
    versions: list[VersionInfo] | None = Field(
        description="each version (declared, served or asked for) with its state and queued tasks; null when Redis "
        "cannot be reached"
    )
    aliases: dict[str, dict[str, float]] = Field(description="alias -> {version: weight}")
    gpu: GpuRequirement
    queue: str
    timeout_s: float
    max_attempts: int
    backoff_s: float
    backoff_max_s: float
    max_event_age_s: float | None
    retention_s: int
    payload_schema: dict[str, Any] | None = Field(description="JSON Schema every event must match, if any")
    job: JobInfo | None = Field(None, description="a sharded job: the function its shards run, and its limit")


class FunctionList(_Out):
    items: list[FunctionInfo]


class VersionList(_Out):
    items: list[VersionInfo]


class AliasList(_Out):
    aliases: dict[str, dict[str, float]] = Field(description="alias -> {version: weight}")


VersionKey = Annotated[str, StringConstraints(pattern=f"^{VERSION_RE.pattern}$")]


class AliasChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[VersionKey, Annotated[float, Field(gt=0)]] = Field(
        min_length=1,
        description='version -> weight (> 0), e.g. {"3": 0.9, "4": 0.1}',
        json_schema_extra={"additionalProperties": False},
    )


class QueueSummary(_Out):
    queued: int
    running: int
    completed: int
    failed: int
    cancelled: int


class QueueInfo(_Out):
    function: str
    queue: str
    length: int = Field(description="tasks waiting (QUEUED)")
    served: bool = Field(description="whether a live worker consumes the queue")
    warning: str | None = Field(None, description="set when no live worker consumes it")
    counts: dict[str, int] = Field(description="tasks per state; finished ones while their records are retained")
    summary: QueueSummary
    versions: dict[str, int] = Field(
        description="version -> tasks queued for that version alone (name:version, or an alias's pick); the length "
        "counts them too"
    )


class GpuInfo(BaseModel):
    """One GPU (or virtual GPU) slot as its host's supervisor last reported it."""

    model_config = ConfigDict(extra="allow")  # supervisors may report more facts than this lists

    worker: str
    host: str | None = None
    index: int | None = None
    name: str | None = None
    model: str | None = None
    uuid: str | None = None
    virtual: bool | None = None
    memory_total_mb: int | None = None
    memory_used_mb: int | None = None
    memory_free_mb: int | None = None
    memory_others_mb: int | None = Field(None, description="held by processes other than this worker's")
    utilization_pct: int | None = None
    pid: int | None = None
    up: bool | None = None
    restarts: int | None = None
    seen_at: float | None = None
    stale: bool = Field(description="not refreshed lately: its host may be gone")
    task_id: str | None = Field(None, description="the task it runs, if any (the first of task_ids)")
    task_ids: list[str] = Field(default_factory=list, description="every task it holds: a batch's events each")
    cordoned: dict[str, Any] | None = Field(
        None, description="taken out of service: reason, by (health or operator), at"
    )
    health: dict[str, Any] | None = Field(None, description="broken (why, or null) and warnings (throttling...)")
    temperature_c: int | None = None
    power_w: float | None = None


class CordonRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=500, description="why: shown with the GPU")


class Cordon(_Out):
    worker: str
    cordoned: bool
    was_cordoned: bool | None = Field(None, description="uncordon: whether it was cordoned")


class UsageRow(_Out):
    """GPU time of one function, pool or GPU model (the one named by ``by``; the others are absent)."""

    model_config = ConfigDict(extra="allow")  # the row's key: function, pool or model

    gpu_seconds: float = Field(description="every run, GPUs held x handler time")
    runs: int
    cost: float | None = Field(description="at worker.gpu_hour_price; null where its GPU model is not priced")


class UsageList(_Out):
    items: list[UsageRow]


class GpuGroup(_Out):
    """The GPUs of one pool and model."""

    pool: str
    model: str
    gpus: int
    busy: int = Field(description="running a task")
    idle: int = Field(description="up, and running no task")
    stale: int = Field(description="not refreshed lately: their host may be gone")
    hosts: list[str]


class GpuList(_Out):
    items: list[GpuInfo]
    pools: list[GpuGroup] = Field(description="the same GPUs by pool and model; a host in several pools counts in each")


class ScalingNeed(_Out):
    pool: str
    model: str = Field(description="the GPU model, lower case, or any")
    queued: int
    running: int
    slots_per_worker: int = Field(description="GPU slots per worker host")
    ready: int = Field(description="worker hosts that take tasks")
    starting: int = Field(description="worker hosts up whose GPU workers are not ready yet")
    desired: int = Field(description="worker hosts needed now: ceil((queued + running) / slots_per_worker)")
    additional: int = Field(description="desired less the ready and starting hosts, at least 0")


class ScalingList(_Out):
    items: list[ScalingNeed]


class QueueView(_Out):
    name: str
    depth: int
    oldest_age_s: float
    running: int


class MinuteCounts(_Out):
    minute: int = Field(description="the minute's start, Unix seconds")
    succeeded: int
    failed: int = Field(description="finished in any other state")


class DeadLetterView(_Out):
    trigger: str
    reason: str
    detail: str
    source: str
    at: float


class Overview(_Out):
    at: float
    gpus: list[dict[str, Any]] = Field(
        description="GET /v1/gpus, each with the tasks it holds and their progress (tasks; task: the first)"
    )
    queues: list[QueueView]
    per_minute: list[MinuteCounts] = Field(description="the last 60 minutes, oldest first")
    dead_letters: list[DeadLetterView] = Field(description="the latest, newest first")
    dead_letters_total: int
    callback_backlog: int
    parked: int


class ParkedRecord(_Out):
    id: str = Field(description="the parked entry's id; pass it to resend or drop")
    destination: str
    key: str = Field(description="the task id (callback records) or the message's source (dead letters)")
    reason: str = Field(description="why the destination refused it")
    parked_at: float
    bytes: int
    headers: dict[str, Any]
    value: str = Field(description="the first 1,000 characters of the record")


class ParkedPage(_Out):
    items: list[ParkedRecord]
    total: int = Field(description="parked records in all")


PARKED_ID = f"^{PARKED_ID_RE}$"


class ParkedAction(BaseModel):
    """Which parked records to act on: ``ids``, or ``all`` (resend only)."""

    model_config = ConfigDict(extra="forbid")
    ids: list[Annotated[str, Field(pattern=PARKED_ID)]] = Field(default_factory=list, max_length=10_000)
    all: bool = False


class ParkedOutcome(_Out):
    count: int = Field(description="records moved back to delivery (resend) or removed (drop)")
