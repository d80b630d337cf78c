"""What one attempt leaves behind: its result as stored JSON (:func:`result_json`), its callback record and final
transition (:class:`Finisher`), and what a run leaves for whoever writes its pipeline (:class:`Outcomes`, see
:mod:`gpufleet.worker.ahead`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
import structlog

from gpufleet.delivery.records import Condition, callback_record, error_payload, fit_record
from gpufleet.errors import PermanentTaskError
from gpufleet.functions import LATEST, Function
from gpufleet.registry.jobs import MAX_SHARD_RESULT_BYTES
from gpufleet.registry.messages import parse_queue
from gpufleet.registry.model import Callback, Claim, State, usage_of, used

if TYPE_CHECKING:
    from gpufleet.worker.bundle import ProcessBundle

log = structlog.get_logger("gpufleet.worker")


def result_json(fn: Function, result: Any, shard: bool = False) -> bytes:
    """A result as stored JSON; one that cannot be (or a shard's over :data:`MAX_SHARD_RESULT_BYTES`: its job's merge
    reads them all) is a PermanentTaskError (every attempt would give it)."""
    if hasattr(result, "model_dump"):
        result = result.model_dump(mode="json")
    try:
        value = orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:
        what = f"function {fn.name!r} returned a {type(result).__name__} that cannot be stored as JSON: {exc}"
        raise PermanentTaskError("ResultNotSerializable", what) from None
    if shard and len(value) > MAX_SHARD_RESULT_BYTES:
        raise PermanentTaskError(
            "ShardResultTooLarge",
            f"function {fn.name!r} returned {len(value)} bytes for a "
            f"shard, more than {MAX_SHARD_RESULT_BYTES}: upload it (ctx.upload) and return its "
            "URI",
        )
    return value


class Outcomes(NamedTuple):
    """What a run leaves to write: its pipeline, the outcomes to build into it, and the log lines to say once they
    are written."""

    pipe: Any
    builds: list[Callable[[], Any]]
    lines: list[Callable[[], None]]

    def build(self) -> None:
        for build in self.builds:
            build()

    def say(self) -> None:
        for line in self.lines:
            line()


class Finisher:
    """Builds the callback record and performs the final transition for one attempt."""

    def __init__(
        self,
        bundle: ProcessBundle,
        task_id: str,
        function: str,
        token: str,
        event: Any,
        claim: Claim,
        fn: Function | None,
        record: dict[str, Any] | None = None,
        pipe: Any = None,
    ) -> None:
        self.bundle = bundle
        self.pipe = pipe  # the outcome goes into this pipeline, with the next claim; None: written at once
        self.retention_s = fn.retention_s if fn else None
        self.version = fn.version if fn else LATEST  # the code that ran: executedVersion
        self.task_id = task_id
        self.function = function
        self.token = token
        self.event = event
        self.claim = claim
        self.record = record  # the stored record, read only when finishing for a killed pool process
        self.outputs: list[str] = []
        self.started_at: float | None = None  # when the handler started: after the claim, for a task claimed ahead
        self.handled = False  # the handler returned an exception for this event (a batch's): "Handled", not raised
        self.peak_mb: int | None = None  # the most GPU memory its handler call held (see gpufaults.peak_mb)
        self.tallied_us = 0  # this attempt's GPU time already in the counters (a run that ran out of memory here)
        self.ran_s = 0.0  # how long its handler calls ran (see Attempts.guarded)
        self.shards: list[dict[str, Any]] | None = None  # a job's: its shards, listed in its record

    def succeed(self, value: bytes, outputs: list[str] | None = None, finished_at: float | None = None) -> bool:
        self.outputs = outputs or []
        fields: dict[str, Any] = {"result": value, **({"outputs": self.outputs} if self.outputs else {})}
        return self._write(State.SUCCEEDED, Condition.SUCCESS, orjson.Fragment(value), fields, finished_at)

    def fail(self, exc: BaseException, error_type: str | None = None) -> bool:
        return self.finish(State.FAILED, Condition.RETRIES_EXHAUSTED, error_payload(exc, error_type))

    def finish(self, state: State, condition: Condition, error: dict[str, Any]) -> bool:
        return self._write(state, condition, error, {"error": error, "condition": condition.value})

    def cancelled(self, message: str) -> bool:
        return self.finish(
            State.CANCELLED, Condition.CANCELLED, {"errorType": "Cancelled", "errorMessage": message, "stackTrace": []}
        )

    def _write(
        self,
        state: State,
        condition: Condition,
        response: Any,
        fields: dict[str, Any],
        finished_at: float | None = None,
    ) -> bool:
        finished = finished_at or time.time()
        started = self.started_at or self.claim.started_at
        record = callback_record(
            task_id=self.task_id,
            function=self.function,
            condition=condition,
            attempts=self.claim.attempts,
            event=self.event,
            worker=self.bundle.worker_name if self.record is None else str(self.record.get("worker", "")),
            gpu=self.bundle.gpu if self.record is None else str(self.record.get("gpu", "")),
            started_at=started,
            finished_at=finished,
            response=response,
            fleet=self.bundle.fleet.settings.redis.key_prefix,
            version=self.version,
            outputs=self.outputs,
            handled=self.handled,
        )
        if self.shards is not None:  # gpufleet's own, where a Lambda consumer ignores it
            record["responseContext"]["shards"] = self.shards
        spent = self.spent(finished)
        record["responseContext"]["usage"] = usage_of({"state": state.value, "used": spent})
        fields = {**fields, "condition": condition.value, "used": spent}
        if self.started_at is not None:
            fields["started_at"] = self.started_at
        dest = self.claim.on_success if condition is Condition.SUCCESS else self.claim.on_failure
        limit = self.bundle.fleet.settings.defaults.max_record_bytes
        callbacks = [Callback(dest=dest, value=fit_record(record, limit), condition=condition.value)] if dest else []
        finish = self.bundle.registry.finish
        written = finish(self.task_id, self.token, state, fields, callbacks, self.retention_s, self.pipe, finished)
        self._observe(finished, written)
        if not written:
            log.warning("task was taken over or finished elsewhere; outcome not recorded", task_id=self.task_id)
        return written

    def retry_later(self, delay_s: float, error: dict[str, Any]) -> None:
        """Back to its queue in ``delay_s``, for its next attempt."""
        now = time.time()
        written = self.bundle.registry.retry_later(self.task_id, self.token, delay_s, error, self.pipe, self.gpu_us())
        self._observe(now, written)

    def gpu_us(self) -> int:
        """The GPU time (µs) the task's runs took so far: the earlier ones' and this one's (GPUs held x handler
        time, as a monotonic clock measured it: a step of the wall clock is no GPU time)."""
        return self.claim.gpu_us + round(self.ran_s * 1e6) * self.bundle.gpu_count

    def spent(self, finished: float) -> str:
        """What the event used, as its record keeps it (``model.used``): the GPU time of all its runs, this run's
        wait in its queue and the part of it its worker spent in setup() (the cold start it paid), this run's peak
        memory, and its cost where ``worker.gpu_hour_price`` prices its GPU model."""
        b, claim = self.bundle, self.claim
        gpu_us = self.gpu_us()
        queue_us, setup_us = None, 0
        if claim.waited_s is not None:
            queued, started = claim.started_at - claim.waited_s, self.started_at or claim.started_at
            queue_us = round(max(0.0, started - queued) * 1e6)
            setup_us = round(b.setups.paid(queued, started) * 1e6)
        price = b.gpu_hour_price
        cost = None if price is None else round(gpu_us / 1e6 / 3600 * price, 8)
        return used(gpu_us, queue_us, setup_us, self.peak_mb, cost)

    def ran_out(self, error: dict[str, Any], budget: int, min_room_mb: int | None) -> int:
        """Its GPU ran out of memory (or broke): back to its queue under ``budget``."""
        return self._back(error, budget, min_room_mb=min_room_mb)

    def preempt(self, budget: int) -> int:
        """Its host's GPUs were reclaimed: back to its queue, its attempt not spent, under ``budget``."""
        message = f"the GPUs of {self.bundle.worker_name} were reclaimed (a preemption notice); it runs again"
        return self._back({"errorType": "Preempted", "errorMessage": message}, budget, preempted=True)

    def _back(self, error: dict[str, Any], budget: int, **how: Any) -> int:
        """Back to the head of its queue under ``budget`` (see ``Registry.hand_back``: 1, 0, or -1 past it), its
        GPU time so far carried and counted."""
        now = time.time()
        back = self.bundle.registry.hand_back(
            self.task_id, self.token, self.bundle.envelopes, None, gpu_budget=budget, error=error, gpu_us=self.gpu_us(),
            **how,
        )  # fmt: skip
        self._observe(now, back == 1)
        return back

    def again_here(self, error: dict[str, Any], budget: int) -> bool:
        """Its GPU ran out of memory, and it runs again here at once: the retry recorded under ``budget``, with its
        GPU time so far (what a later claim carries if this process dies)."""
        gpu_us = self.gpu_us()
        back = self.bundle.registry.hand_back(
            self.task_id, self.token, self.bundle.envelopes, None, gpu_budget=budget, error=error, gpu_us=gpu_us,
            stay=True,
        )  # fmt: skip
        if back == 1:  # the run that ran out is a run of its own in the GPU time counters
            self._tally_gpu_time(gpu_us)
        return back == 1

    def _observe(self, finished: float, written: bool) -> None:
        """The attempt's duration (from its claim), for the histogram, and its GPU time (its handler's, as its record
        counts it), for the counters; written at once with an outcome written at once (this process may be about to
        die). One in a pipeline is counted even if the pipeline then finds the task taken over."""
        if written:
            b = self.bundle
            b.tally.observe("duration", self.function, finished - (self.started_at or self.claim.started_at))
            self._tally_gpu_time(self.gpu_us())
        if self.pipe is None:
            self.bundle.write_tally()

    def _tally_gpu_time(self, gpu_us: int) -> None:
        """Count a run's GPU time (this attempt's ``gpu_us`` less what its earlier runs counted), in its pool."""
        b = self.bundle
        pool = (parse_queue(b.fleet.settings.redis.key_prefix, self.claim.queue) or ("",))[0]
        ran_us = gpu_us - self.claim.gpu_us
        b.tally.gpu_time(self.function, b.gpu_model, pool, (ran_us - self.tallied_us) / 1e6)
        self.tallied_us = ran_us


def timed_out_by_watchdog(bundle: ProcessBundle, task_id: str, token: str) -> None:
    """Called in the worker's parent process once its watchdog killed a pool process past the hard limit."""
    record = bundle.registry.get(task_id, event=True) or {}
    claim = Claim(
        True,
        "RUNNING",
        int(record.get("attempts", 1)),
        int(record.get("max_attempts", 1)),
        record.get("on_success", ""),
        record.get("on_failure", ""),
        float(record.get("started_at") or time.time()),
        queue=str(record.get("queue", "")),
    )
    function = str(record.get("function", "?"))
    fn = bundle.fleet.functions.get(function)
    done = Finisher(bundle, task_id, function, token, record.get("event"), claim, fn, record)
    limit = f" ({fn.timeout_s:g} s)" if fn is not None else ""
    done.finish(
        State.TIMED_OUT,
        Condition.TIMED_OUT,
        {
            "errorType": "TimedOut",
            "errorMessage": f"the handler ran past timeout_s{limit}, ignored the time limit, and its process "
            "was killed",
            "stackTrace": [],
        },
    )
