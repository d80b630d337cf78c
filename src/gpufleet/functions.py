"""Declaring the functions a fleet serves, and loading them from the ``workers/`` folder.

A function is a plain Python callable wrapped by :func:`function`::

    from gpufleet import Context, Gpu, function

    @function(name="embed", gpu=Gpu(model="any"), timeout_s=600, max_attempts=3)
    def embed(event: dict, ctx: Context) -> dict:
        model = ctx.state            # what setup() returned, once per worker process
        ctx.progress(0.5, "half way")
        return {"norm": 1.0}

    @embed.setup
    def load_model() -> object:
        return build_model()         # runs once per GPU worker process, after fork: the model stays warm

The decorator only attaches a spec to the callable. Nothing is registered globally at import or decoration time:
:func:`gpufleet.config.load_functions` imports the modules of a folder and collects the :class:`Function` objects
it finds.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from gpufleet.context import Context
from gpufleet.errors import ConfigError
from gpufleet.scheduling.gpumodels import MIG_PROFILE_RE, check_model

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")  # no ':': "embed:4" names a version of embed
ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")  # an alias's name: gpufleet.scheduling.aliases
# A pool's name is one part of its queues' names (``gpufleet.<pool>.<model>.<function>``): no dots.
POOL_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def weights_problem(weights: Mapping[str, float]) -> str | None:
    """Why ``weights`` cannot be an alias's, or None."""
    if not weights:
        return "name at least one version"
    bad = [v for v in weights if not VERSION_RE.fullmatch(v)]
    if bad:
        return f"not versions: {bad}"
    if any(not isinstance(w, int | float) or isinstance(w, bool) or not w > 0 for w in weights.values()):
        return "weights are numbers > 0"
    return None


LATEST = "$LATEST"  # the version of a function that declares none, as Lambda names it
FUNCTIONS_NAMESPACE = "gpufleet_workers."  # function files are imported as its modules: never shadowing a library
MAX_TIMEOUT_S = 86_400  # tasks may run up to 24 h, like Function Compute GPU tasks
MAX_OOM_RETRIES = 10
MAX_PREEMPTIONS = 100
MAX_GPU_GB = 4096  # a typo's bound, not a GPU's: the largest today hold under 300 GiB
GPU_COUNTS = (1, 2, 4, 8)  # GPUs per task: the aligned groups a host's GPUs split into


# (event, ctx) -> result; a batch function's is (list of events, BatchContext) -> list of results, in order.
Handler = Callable[[Any, Any], Any]
MAX_BATCH = 256


@dataclass(frozen=True)
class Batch:
    """Dynamic batching: the handler takes a list of events, formed from the tasks queued for the function.

    Args:
        max_size: the most events per call.
        max_wait_ms: how long a batch that is not full may wait for more tasks while they keep arriving. A lone task
            (nothing else queued) runs at once, alone.
    """

    max_size: int = 32
    max_wait_ms: float = 20.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_size <= MAX_BATCH:
            raise ConfigError(f"batch max_size={self.max_size}", key="batch.max_size", fix=f"use 1 to {MAX_BATCH}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"batch max_wait_ms={self.max_wait_ms}", key="batch.max_wait_ms", fix="use 0 to 10000")


@dataclass(frozen=True)
class Gpu:
    """What a function needs from its GPUs.

    Args:
        count: GPUs per task, all of one host: 1, 2, 4 or 8. A task of N runs in a process that sees N GPUs (its
            ``CUDA_VISIBLE_DEVICES`` lists them), one of the host's aligned groups of N (GPUs 0-1, 2-3...: the
            pairs and quads NVLink joins), which it takes at once or not at all (see :mod:`gpufleet.worker.holds`).
        model: a GPU series (``H100``, ``A100``...; a full name such as ``NVIDIA H100 80GB HBM3`` says the same), or
            ``any``. It matches a worker's GPU by series: see :mod:`gpufleet.scheduling.gpumodels`.
        pools: ordered pools (regions) to run in; the first is preferred.
        max_queue_wait_s: a task goes to a later pool when the earlier ones' estimated queue wait is longer than this
            (see :mod:`gpufleet.scheduling.placement`); None: only a pool with no live worker for the function is passed
            over.
        memory_gb: the GPU memory one task needs, its model included (GiB). A GPU smaller than this never serves the
            function; one whose free memory (with what its worker holds already) is less takes none of its tasks until
            it has room; a task no GPU of the fleet can hold is refused at intake (``gpu_memory``). None: any GPU.
            A MIG instance serves a function that names its memory and fits in it, as well as those of its profile.
        mig: a MIG profile (``1g.10gb``, ``3g.40gb``): the function runs on MIG instances of that profile alone.
            "": on whole GPUs (or on a MIG instance its ``memory_gb`` fits).
    """

    count: int = 1
    model: str = "any"
    pools: tuple[str, ...] = ("default",)
    max_queue_wait_s: float | None = None
    memory_gb: float | None = None
    mig: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or self.count not in GPU_COUNTS:
            raise ConfigError(f"count={self.count!r}", key="gpu.count", fix="GPUs per task: 1, 2, 4 or 8")
        if self.mig and (not MIG_PROFILE_RE.fullmatch(self.mig) or self.count != 1):
            raise ConfigError(
                f"mig={self.mig!r}" + (f" with count={self.count}" if self.count != 1 else ""),
                key="gpu.mig",
                fix="a MIG profile as nvidia-smi names it (1g.10gb, 3g.40gb), for a task of one instance",
            )
        object.__setattr__(self, "model", check_model(self.model, "gpu.model"))  # frozen: normalised once, here
        if not self.pools:
            raise ConfigError("a function needs at least one pool", key="gpu.pools", fix="e.g. pools=('default',)")
        if len(set(self.pools)) != len(self.pools) or not all(POOL_RE.fullmatch(p) for p in self.pools):
            raise ConfigError(
                f"bad pools {self.pools!r}",
                key="gpu.pools",
                fix="distinct names of lowercase letters, digits, '-' or '_'",
            )
        if self.max_queue_wait_s is not None and not self.max_queue_wait_s > 0:
            raise ConfigError(
                f"max_queue_wait_s={self.max_queue_wait_s}",
                key="gpu.max_queue_wait_s",
                fix="use a positive number of seconds, or None",
            )
        if self.memory_gb is not None and (isinstance(self.memory_gb, bool) or not 0 < self.memory_gb <= MAX_GPU_GB):
            raise ConfigError(
                f"memory_gb={self.memory_gb}", key="gpu.memory_gb", fix=f"use GiB above 0, at most {MAX_GPU_GB}"
            )

    @property
    def memory_mb(self) -> int | None:
        """``memory_gb`` in MiB, as NVML counts, rounded up."""
        return None if self.memory_gb is None else math.ceil(self.memory_gb * 1024)


MAX_SHARDS = 10_000  # the most shards any job may split into (a job's own max_shards is at most this)
Merge = Callable[[Any, list[Any], Any], Any]  # (event, shard results in order, ctx) -> the job's result


@dataclass
class Shards:
    """What makes a function a sharded job (see :func:`job`): the function each shard runs, the merge step, and the
    limits."""

    function: str
    max_shards: int = 1000
    records: bool = False  # shards send their own records too, to the job's destinations
    merge_fn: Merge | None = None


@dataclass
class Function:
    """A handler plus the policy the fleet applies to it."""

    name: str
    handler: Handler
    version: str = LATEST
    gpu: Gpu = field(default_factory=Gpu)
    timeout_s: float = 900.0
    max_attempts: int = 3
    oom_retries: int = 2
    max_preemptions: int = 3
    backoff_s: float = 1.0
    backoff_max_s: float = 300.0
    max_event_age_s: float | None = None
    retention_s: int | None = None
    on_success: str | None = None
    on_failure: str | None = None
    payload: type[BaseModel] | None = None
    setup_fn: Callable[[], Any] | None = None
    teardown_fn: Callable[[Any], Any] | None = None  # teardown(state): unloads what setup() returned
    preempt_fn: Callable[[Any], Any] | None = None  # on_preempt(ctx): runs when the host's GPUs are reclaimed
    batch: Batch | None = None
    when_inactive: Literal["queue", "refuse"] = "queue"
    shards: Shards | None = None  # a sharded job: the handler splits, shards run on GPUs, merge combines
    output_buckets: tuple[str, ...] | None = None  # where ctx.upload may write; None: any bucket the key can
    source_file: str = "<unknown>"

    def __post_init__(self) -> None:
        where = f"function {self.name!r}"
        if not NAME_RE.match(self.name):
            raise ConfigError(
                f"{where}: bad name", key="name", fix="lowercase letters, digits, '-' or '_', starting with a letter"
            )
        if self.version != LATEST and not VERSION_RE.fullmatch(self.version):
            raise ConfigError(
                f"{where}: version={self.version!r}",
                key="version",
                fix="1 to 32 letters, digits, '.', '_' or '-', from a letter or digit",
            )
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise ConfigError(f"{where}: timeout_s={self.timeout_s}", key="timeout_s", fix="use 0 < timeout_s <= 86400")
        if self.max_attempts < 1:
            raise ConfigError(f"{where}: max_attempts={self.max_attempts}", key="max_attempts", fix="use 1 or more")
        if not 0 <= self.oom_retries <= MAX_OOM_RETRIES:
            raise ConfigError(
                f"{where}: oom_retries={self.oom_retries}", key="oom_retries", fix=f"use 0 to {MAX_OOM_RETRIES}"
            )
        if not 0 <= self.max_preemptions <= MAX_PREEMPTIONS:
            raise ConfigError(
                f"{where}: max_preemptions={self.max_preemptions}",
                key="max_preemptions",
                fix=f"use 0 to {MAX_PREEMPTIONS}",
            )
        if self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ConfigError(f"{where}: bad backoff", key="backoff_s", fix="use 0 <= backoff_s <= backoff_max_s")
        if self.max_event_age_s is not None and self.max_event_age_s <= 0:
            raise ConfigError(
                f"{where}: max_event_age_s={self.max_event_age_s}",
                key="max_event_age_s",
                fix="use a positive number of seconds, or None for no limit",
            )
        if self.retention_s is not None and self.retention_s < 60:
            raise ConfigError(f"{where}: retention_s={self.retention_s}", key="retention_s", fix="use 60 or more")
        _check_signature(where, self.handler, "handler", 2, "def handler(event, ctx)")
        if self.shards is not None and not 1 <= self.shards.max_shards <= MAX_SHARDS:
            raise ConfigError(
                f"{where}: max_shards={self.shards.max_shards}", key="max_shards", fix=f"use 1 to {MAX_SHARDS}"
            )
        if self.shards is not None and self.batch is not None:
            raise ConfigError(f"{where}: a job cannot batch", key="batch", fix="batch its shard function instead")

    def setup(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Register the per-process setup hook; its return value becomes ``ctx.state``."""
        _check_signature(f"function {self.name!r}", fn, "setup", 0, "def setup()")
        self.setup_fn = fn
        return fn

    def teardown(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Register the hook that unloads what ``setup()`` returned (``teardown(state)``), when a worker that keeps
        fewer functions loaded than it serves (``worker.warm_functions``) makes room for another."""
        _check_signature(f"function {self.name!r}", fn, "teardown", 1, "def teardown(state)")
        self.teardown_fn = fn
        return fn

    def on_preempt(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Register the hook that runs, with the running task's ``ctx``, when its host's GPUs are being reclaimed (see
        ``worker.preempt_notice``): the place to ``ctx.checkpoint`` what the next attempt resumes from."""
        _check_signature(f"function {self.name!r}", fn, "on_preempt", 1, "def on_preempt(ctx)")
        self.preempt_fn = fn
        return fn

    def merge(self, fn: Merge) -> Merge:
        """Register a job's merge step: ``merge(event, results, ctx)``, with the shards' results in their order; what
        it returns is the job's result."""
        if self.shards is None:
            raise ConfigError(
                f"function {self.name!r}: only a job merges", key="merge", fix="declare it with @job(shard=...)"
            )
        _check_signature(f"job {self.name!r}", fn, "merge", 3, "def merge(event, results, ctx)")
        self.shards.merge_fn = fn
        return fn

    def payload_error(self, event: Any) -> str | None:
        """Why ``event`` does not match the function's payload model, or None when it does (or there is none)."""
        if self.payload is None:
            return None
        try:
            self.payload.model_validate(event)
        except ValidationError as exc:
            return validation_problem(exc)
        return None

    def backoff_for(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1``: exponential, capped (jitter is added by the caller)."""
        return float(min(self.backoff_max_s, self.backoff_s * (2 ** max(attempt - 1, 0))))

    def __call__(self, event: Any, ctx: Context) -> Any:
        return self.handler(event, ctx)


def validation_problem(exc: ValidationError) -> str:
    """A pydantic error as one line a user reads: where and what, without pydantic's "further information" URL nor
    the rejected value (it may be large, or secret)."""
    problems = [
        f"{'.'.join(str(p) for p in e['loc']) or 'the event'}: {e['msg']}"
        for e in exc.errors(include_url=False, include_input=False)[:5]
    ]
    more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return f"{exc.title}: {'; '.join(problems)}{more}"


def function(
    name: str | None = None,
    *,
    version: str = LATEST,
    gpu: Gpu | None = None,
    gpu_memory_gb: float | None = None,
    gpus: int | None = None,
    timeout_s: float = 900.0,
    max_attempts: int = 3,
    oom_retries: int = 2,
    max_preemptions: int = 3,
    backoff_s: float = 1.0,
    backoff_max_s: float = 300.0,
    max_event_age_s: float | None = None,
    retention_s: int | None = None,
    on_success: str | None = None,
    on_failure: str | None = None,
    payload: type[BaseModel] | None = None,
    batch: Batch | None = None,
    when_inactive: Literal["queue", "refuse"] = "queue",
    output_buckets: tuple[str, ...] | None = None,
) -> Callable[[Handler], Function]:
    """Declare a fleet function. See the module docstring for an example.

    Args:
        name: the function's name; defaults to the handler's name with ``_`` kept.
        version: the version this code is, e.g. ``"4"``: callback records name it (``functionVersion``,
            ``executedVersion``, ``functionArn``). Default ``$LATEST``.
        gpu: the GPU it needs.
        gpu_memory_gb: the same as ``gpu=Gpu(memory_gb=...)``: the GPU memory one task needs, in GiB (on each of
            its GPUs).
        gpus: the same as ``gpu=Gpu(count=...)``: GPUs per task, of one host (1, 2, 4 or 8).
        timeout_s: hard limit for one attempt, up to 86400.
        max_attempts: attempts before a RetriesExhausted failure record.
        oom_retries: runs again after the GPU ran out of memory (or a CUDA error broke the process's context), on
            top of ``max_attempts``: the first where it ran, the next on a GPU with more room where the fleet has one;
            then a ``GpuOutOfMemory`` failure record. See :mod:`gpufleet.worker.gpufaults`.
        max_preemptions: attempts its host's GPUs were reclaimed under (a spot VM's notice; see
            ``worker.preempt_notice``) that do not spend ``max_attempts``; past them, a preemption is an attempt.
        backoff_s: first retry delay; doubles per attempt up to ``backoff_max_s`` (with +-20% jitter).
        max_event_age_s: a task that waited longer than this since its event is EXPIRED and never starts
            (a ``EventAgeExceeded`` failure record); None: no limit.
        retention_s: how long finished task records are kept (default: ``defaults.retention_s``, 7 days).
        on_success: destination URL for success records (default: the fleet's).
        on_failure: destination URL for failure records (default: the fleet's).
        payload: a pydantic model; events that do not validate go to the dead-letter destination.
        batch: :class:`Batch` to take a list of events per call (``def handler(events, ctx)``, ``ctx`` a
            :class:`BatchContext`) and return a list of results in the same order. Each event keeps its own task:
            id, state, attempts, progress and record. An exception object in place of a result fails that event
            alone; a call that raises is split in halves, down to single events, so one bad event cannot fail its
            neighbours.
        when_inactive: what an invocation (API, CLI) does when no live worker has the version asked for ACTIVE:
            ``"queue"`` it all the same (it waits for one), or ``"refuse"`` it: 503 ``version_not_active`` (none
            is up yet), or 409 ``version_error`` (setup() failed on every worker that tried). Triggers always queue.
        output_buckets: the only buckets ``ctx.upload`` may write to, whatever an event's ``to=`` says (an
            upload elsewhere fails the task, ``OutputNotAllowed``); None: any bucket the fleet's key can write.
    """

    needs = gpu or Gpu()
    if gpu_memory_gb is not None:
        if needs.memory_gb not in (None, gpu_memory_gb):
            raise ConfigError(
                f"gpu_memory_gb={gpu_memory_gb} and gpu=Gpu(memory_gb={needs.memory_gb})",
                key="gpu_memory_gb",
                fix="say it once",
            )
        needs = dataclasses.replace(needs, memory_gb=gpu_memory_gb)
    if gpus is not None:
        if gpu is not None and gpu.count not in (1, gpus):
            raise ConfigError(f"gpus={gpus} and gpu=Gpu(count={gpu.count})", key="gpus", fix="say it once")
        needs = dataclasses.replace(needs, count=gpus)

    def wrap(handler: Handler) -> Function:
        return Function(
            name=name or handler.__name__,
            handler=handler,
            version=version,
            gpu=needs,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            oom_retries=oom_retries,
            max_preemptions=max_preemptions,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
            max_event_age_s=max_event_age_s,
            retention_s=retention_s,
            on_success=on_success,
            on_failure=on_failure,
            payload=payload,
            batch=batch,
            when_inactive=when_inactive,
            output_buckets=output_buckets,
            source_file=getattr(sys.modules.get(handler.__module__), "__file__", None) or "<unknown>",
        )

    return wrap


def job(
    name: str | None = None,
    *,
    shard: Function | str,
    max_shards: int = 1000,
    shard_records: bool = False,
    **policy: Any,
) -> Callable[[Handler], Function]:
    """Declare a sharded job: the decorated handler splits the event into shard events, ``shard`` runs once per shard
    on the GPUs that serve it (in parallel, each under the shard function's own policy), and the step registered with
    ``@<job>.merge`` combines their results::

        @job(name="upscale", shard=upscale_tile, max_shards=256)
        def split(event: dict, ctx: Context) -> list[dict]:
            return [{"uri": event["uri"], "tile": t} for t in tiles(event)]   # references, not the data

        @split.merge
        def stitch(event: dict, results: list[dict], ctx: Context) -> dict:
            return {"uri": ctx.upload(join(results))}

    Split and merge run on a worker of the job's own pool (``gpu=``: put them on CPU-only hosts if GPUs are
    scarce), and only while they run: the job holds no worker while its shards do. A shard event is JSON of at most
    :data:`~gpufleet.registry.jobs.MAX_SHARD_EVENT_BYTES`: pass S3 URIs and ranges. See :mod:`gpufleet.registry.jobs`.

    Args:
        shard: the function each shard runs (or its name); it must be served by the same fleet.
        max_shards: the most shards one job may split into (at most :data:`MAX_SHARDS`); a split that returns more,
            or none, fails the job.
        shard_records: send each shard's record to the job's destinations too (default: only the job's).
        policy: as :func:`function` (``timeout_s`` and ``max_attempts`` apply to the split, and again to the merge).
    """

    def wrap(split: Handler) -> Function:
        fn = function(name, **policy)(split)
        fn.shards = Shards(shard if isinstance(shard, str) else shard.name, max_shards, shard_records)
        fn.__post_init__()  # the job's own checks
        return fn

    return wrap


def _check_signature(where: str, fn: Callable[..., Any], what: str, arity: int, shape: str) -> None:
    """A handler that cannot take ``(event, ctx)`` would fail at every run: refuse it at load instead."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable without one: it will tell at run time
        return
    try:
        signature.bind(*[None] * arity)
    except TypeError:
        name = getattr(fn, "__qualname__", repr(fn))
        raise ConfigError(
            f"{where}: {what} {name}{signature} cannot be called as {shape}", key=what, fix=f"give it the shape {shape}"
        ) from None
