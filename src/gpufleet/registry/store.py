"""The task registry in Redis: state, attempts, progress, timestamps, worker and GPU, result or error.

States: see :mod:`gpufleet.registry.model`. Every transition is one Lua script (``registry/scripts/*.lua``, keys
in :mod:`gpufleet.registry.keyspace`) with compare-and-set on the state and the owner token, so a task can never run
twice at once nor finish twice. Finishing writes the callback record to a Redis stream in the same script, so a
finished task always has its record, and the dispatcher delivers it later without holding the GPU.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import orjson
import redis

from gpufleet.registry import connection, enqueue
from gpufleet.registry.keyspace import Keyspace, script
from gpufleet.registry.model import (
    VIEW_FIELDS,
    VIEW_KEYS,
    Callback,
    Claim,
    Enqueued,
    EnvelopeFor,
    NewTask,
    State,
    Taken,
    decode_record,
)

if TYPE_CHECKING:
    from gpufleet.settings import FleetSettings


CLIENT_OPTIONS: dict[str, Any] = {"socket_timeout": 30, "socket_connect_timeout": 5, "health_check_interval": 30}


def _taken(replies: list[Any], now: float) -> list[Taken | str]:
    """The tasks a pop_claim or claim_popped script claimed (see ``take_message`` in ``helpers.lua``)."""
    taken: list[Taken | str] = []
    for reply in replies:
        if reply[0] == b"other":
            taken.append(reply[1].decode())
        else:
            task_id, function, event, meta = reply[10:14]
            claim = Claim.from_reply(reply, now)
            taken.append(Taken(claim, task_id.decode(), function.decode(), orjson.loads(event), orjson.loads(meta)))
    return taken


class Registry:
    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "gpufleet",
        retention_s: int = 7 * 86_400,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
        aging_s: float = 60.0,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.retention_s = retention_s
        self.aging_s = aging_s  # defaults.priority_aging_s: a re-queued task goes in at the level it has earned
        self.wait_replicas = wait_replicas  # enqueue_many returns once this many replicas have the tasks
        self.wait_timeout_ms = wait_timeout_ms
        self.keys = Keyspace(prefix)
        self._enqueue = client.register_script(script("enqueue_many"))
        self._claim = client.register_script(script("claim"))
        self._pop_claim = client.register_script(script("pop_claim"))
        self._claim_popped = client.register_script(script("claim_popped"))
        self._renew = client.register_script(script("renew"))
        self._finish = client.register_script(script("finish"))
        self._retry = client.register_script(script("retry_later"))
        self._housekeep = client.register_script(script("housekeep"))
        self._finish_queued = client.register_script(script("finish_queued"))
        self._retry_now = client.register_script(script("retry"))
        self._trim = client.register_script(script("trim_index"))
        self._scan_lost = client.register_script(script("scan_lost"))
        self._requeue_lost = client.register_script(script("requeue_lost"))
        self._move_queued = client.register_script(script("move_queued"))
        self._hand_back = client.register_script(script("hand_back"))
        self._age = client.register_script(script("age"))
        self._lapse = client.register_script(script("lapse"))

    @classmethod
    def from_url(cls, url: str, prefix: str = "gpufleet", retention_s: int = 7 * 86_400) -> Registry:
        return cls(connection.client(url, **CLIENT_OPTIONS), prefix, retention_s)

    @classmethod
    def for_fleet(cls, settings: FleetSettings) -> Registry:
        r = settings.redis
        client = connection.client(r.url, **CLIENT_OPTIONS)
        d = settings.defaults
        return cls(client, r.key_prefix, d.retention_s, r.wait_replicas, r.wait_timeout_ms, d.priority_aging_s)

    def pipeline(self) -> connection.ScriptPipeline:
        """A pipeline for the registry's scripts: one round trip per execute (see ScriptPipeline)."""
        return connection.ScriptPipeline(self.client)

    def enqueue_many(self, tasks: list[NewTask]) -> list[Enqueued]:
        """Create the records and push the messages; per task, whether it was created, a duplicate (the id exists
        for the same function and origin) or a conflict (it exists for another).

        Each chunk of :data:`~gpufleet.registry.enqueue.CHUNK` tasks is one atomic script, so no single call holds
        Redis for more than a millisecond or two; the chunks travel in one pipeline, one round trip.

        Raises:
            BrokerError: Redis could not be reached, or too few replicas acknowledged (``redis.wait_replicas``).
        """
        return self.send_enqueue(tasks)()

    def send_enqueue(self, tasks: list[NewTask]) -> Callable[[], list[Enqueued]]:
        """:meth:`enqueue_many` in two halves: the scripts go to Redis now, and the call returned reads their answers
        (and raises as enqueue_many does). A trigger parses its next batch while Redis runs them."""
        replicas = (self.wait_replicas, self.wait_timeout_ms)
        return enqueue.send(self.pipeline(), self._enqueue, self.prefix, tasks, replicas)

    def get(self, task_id: str, event: bool = False) -> dict[str, Any] | None:
        """The task's record; with ``event``, also its ``event`` and ``meta`` (decoded)."""
        raw: dict[bytes, bytes] = self.client.hgetall(self.keys.task(task_id))  # type: ignore[assignment]
        if not raw:
            return None
        return decode_record(raw, task_id, event)

    def stored_calls(self, task_ids: list[str]) -> list[tuple[str, bytes, bytes, str] | None]:
        """(function, event JSON, meta JSON, queue) per task, to build its message again (for the queue its record
        names: the pool intake placed it in); None for a missing record."""
        pipe = self.pipeline()
        for task_id in task_ids:
            pipe.hmget(self.keys.task(task_id), "function", "event", "meta", "queue", "message")
        calls: list[tuple[str, bytes, bytes, str] | None] = []
        for fn, event, meta, queue, message in pipe.execute():
            where = queue.decode() if queue else ""
            if fn and event is not None and meta is not None:
                calls.append((fn.decode(), event, meta, where))
            elif fn and message:  # a record written before the registry kept the event: its Celery envelope
                call = orjson.loads(base64.b64decode(orjson.loads(message)["body"]))[1]
                calls.append((fn.decode(), orjson.dumps(call["event"]), orjson.dumps(call["meta"]), where))
            else:
                calls.append(None)
        return calls

    def _envelopes(self, task_ids: list[str], envelope_for: EnvelopeFor) -> list[tuple[str, bytes]]:
        """(id, envelope) for the tasks this caller can build; a missing record gets an empty envelope, which the
        scripts take as "drop it from the index"."""
        pairs = []
        for task_id, call in zip(task_ids, self.stored_calls(task_ids), strict=True):
            envelope = b"" if call is None else envelope_for(task_id, *call)
            if envelope is not None:
                pairs.append((task_id, envelope))
        return pairs

    def claim(
        self, task_id: str, expect_state: str, expect_token: str, token: str, lease_s: float, worker: str, gpu: str
    ) -> Claim:
        """Take the task for this process, if its state and owner are still what the caller saw."""
        now = time.time()
        reply = self._claim(
            keys=[self.keys.task(task_id), self.keys.leases],
            args=[self.prefix, expect_state, expect_token, token, now, now + lease_s, worker, gpu],
        )
        if reply[0] != b"ok":
            return Claim(ok=False, seen_state=reply[1].decode())
        return Claim.from_reply(reply, now)

    def pop_claim(
        self, queues: list[str], token: str, lease_s: float, worker: str, gpu: str, pipe: Any = None, n: int = 1
    ) -> tuple[list[Any], list[Taken | str]]:
        """Take and claim the next ``n`` tasks from ``queues`` (see ``pop_claim.lua``): a :class:`Taken` each, or
        last, the id of a task that is not waiting, for the caller to judge as any delivery; none when every queue
        is empty. Commands already in ``pipe`` (the last task's outcome) go first, in the same round trip; their
        answers come first."""
        now = time.time()
        pipe = pipe if pipe is not None else self.pipeline()
        self._pop_claim(args=[self.prefix, token, now, now + lease_s, worker, gpu, n, *queues], client=pipe)
        *earlier, replies = pipe.execute()
        return earlier, _taken(replies, now)

    def wait_claim(
        self, lists: list[str], timeout_s: float, token: str, lease_s: float, worker: str, gpu: str
    ) -> list[Taken | str]:
        """Wait up to ``timeout_s`` for a message on ``lists`` (a BRPOP: the first of them, in their order, that has
        one) and claim its task (see ``claim_popped.lua``): as :meth:`pop_claim` answers, [] when none came or it
        was stale. What an idle worker does instead of going back to Celery, whose path to it is slower."""
        popped: tuple[bytes, bytes] | None = self.client.brpop(lists, timeout_s)  # type: ignore[assignment]
        if not popped:
            return []
        now = time.time()
        args: list[Any] = [self.prefix, token, now, now + lease_s, worker, gpu, popped[1]]
        return _taken(self._claim_popped(args=args), now)

    def renew(self, task_id: str, token: str, lease_s: float) -> int:
        """Extend the lease. Returns 0 if this process lost the task, 1 if renewed, 2 if a cancel was asked for."""
        return self.renew_many([(task_id, token)], lease_s)[0]

    def renew_many(self, tasks: list[tuple[str, str]], lease_s: float) -> list[int]:
        """:meth:`renew` for several (task id, token) at once, in one round trip."""
        until = time.time() + lease_s
        pipe = self.pipeline()
        for task_id, token in tasks:
            self._renew(keys=[self.keys.task(task_id), self.keys.leases], args=[token, until, self.prefix], client=pipe)
        return [int(status) for status in pipe.execute()]

    def finish(
        self,
        task_id: str,
        token: str,
        state: State,
        fields: dict[str, Any],
        callbacks: Iterable[Callback],
        retention_s: int | None = None,
        pipe: Any = None,
        finished_at: float | None = None,
    ) -> bool:
        """RUNNING -> a terminal state, with its callback records. False if this process no longer owns the task.
        With a ``pipe``, the script is added to that pipeline and its answer comes with the pipeline's."""
        retention = retention_s or self.retention_s
        if state is State.SUCCEEDED:
            fields = {**fields, "progress": 1}  # whatever the handler last reported: it is done
        args: list[Any] = [self.prefix, token, state.value, finished_at or time.time(), retention, len(fields)]
        for k, v in fields.items():
            args += [k, v if isinstance(v, (str, bytes, int, float)) else orjson.dumps(v)]
        for cb in callbacks:
            args += [cb.dest, cb.value, cb.condition]
        done = self._finish(
            keys=[self.keys.task(task_id), self.keys.leases, self.keys.callbacks], args=args, client=pipe
        )
        return pipe is not None or bool(done)

    def retry_later(
        self, task_id: str, token: str, delay_s: float, error: dict[str, Any], pipe: Any = None, gpu_us: int = 0
    ) -> bool:
        """RUNNING -> QUEUED, pushed again once ``delay_s`` has passed; ``gpu_us``: the GPU time its runs took so far.
        ``pipe``: as for :meth:`finish`."""
        now = time.time()
        done = self._retry(
            keys=[self.keys.task(task_id), self.keys.leases, self.keys.delayed],
            args=[self.prefix, token, now + delay_s, orjson.dumps(error), now, gpu_us],
            client=pipe,
        )
        return pipe is not None or bool(done)

    def lapse(self, task_id: str, token: str) -> None:
        """End the lease of a task whose owner (``token``) is known dead, so that the next housekeeping round (any
        supervisor's, within a second) re-queues it, rather than after ``lease_s``."""
        self._lapse(keys=[self.keys.task(task_id), self.keys.leases], args=[token, self.prefix])

    def set_progress(self, task_id: str, fraction: float, message: str) -> None:
        self.client.hset(self.keys.task(task_id), mapping={"progress": fraction, "progress_message": message[:500]})

    def housekeep(self, envelope_for: EnvelopeFor, limit: int = 500, pages: int = 10) -> tuple[int, int]:
        """Push due retries and re-queue tasks whose lease lapsed. Returns (promoted, reaped).

        ``envelope_for(task_id, function, event, meta, queue)`` builds each one's message; None means this caller does
        not serve that function, and the task is left for a supervisor that does (the next page reads past it, so
        such tasks never block the others). Entries whose record is gone are dropped.
        """
        promoted = reaped = 0
        skip = {self.keys.delayed: 0, self.keys.leases: 0}
        for _ in range(pages):
            now = time.time()
            pipe = self.pipeline()
            for key, offset in skip.items():
                pipe.zrangebyscore(key, "-inf", now, offset, limit)
            due, lapsed = ([i.decode() for i in ids] for ids in pipe.execute())
            if not due and not lapsed:
                break
            promote, reap = self._envelopes(due, envelope_for), self._envelopes(lapsed, envelope_for)
            args: list[Any] = [self.prefix, now, self.aging_s, len(promote)]
            for task_id, envelope in (*promote, *reap):
                args += [task_id, envelope]
            done = self._housekeep(keys=[self.keys.delayed, self.keys.leases], args=args)
            promoted, reaped = promoted + int(done[0]), reaped + int(done[1])
            skip[self.keys.delayed] += len(due) - len(promote)
            skip[self.keys.leases] += len(lapsed) - len(reap)
            if len(due) < limit and len(lapsed) < limit:
                break
        return promoted, reaped

    def hand_back(
        self,
        task_id: str,
        token: str,
        envelope_for: EnvelopeFor,
        message: str | None,
        error_type: str = "WorkerStopped",
        gpu_budget: int | None = None,
        min_room_mb: int | None = None,
        error: dict[str, Any] | None = None,
        gpu_us: int = 0,
        stay: bool = False,
        preempted: bool = False,
    ) -> int:
        """A RUNNING task whose owner (``token``) was stopped on purpose, or cannot run it, goes back to the head of
        its queue, its attempt not counted; ``message`` None: one claimed ahead and given back unstarted (no error
        recorded; ``error``: this error instead). 0 if it finished or changed owner meanwhile, or this caller cannot
        build it. With ``gpu_budget``, one whose GPU ran out of memory: it goes back only while its GPU retries are
        within that (-1 past it: nothing changed), for a GPU with ``min_room_mb`` of room if given, having taken
        ``gpu_us`` of GPU time in all so far; ``stay``: it runs again where it is, still its owner's, this retry
        recorded; ``preempted``: its host's GPUs were reclaimed, and ``gpu_budget`` is its preemptions'."""
        pairs = [(task_id, b"")] if stay else self._envelopes([task_id], envelope_for)
        if not pairs or not (pairs[0][1] or stay):
            return 0
        if message is not None:
            error = {"errorType": error_type, "errorMessage": message}
        args: list[Any] = [self.prefix, token, time.time(), pairs[0][1], orjson.dumps(error) if error else b""]
        args += [self.aging_s, "" if gpu_budget is None else gpu_budget, min_room_mb or "", gpu_us, int(stay)]
        args.append(int(preempted))
        return int(self._hand_back(keys=[self.keys.task(task_id), self.keys.leases], args=args))

    def age(self, aging_s: float, limit: int = 1000) -> int:
        """Move each level's tasks that have waited ``aging_s`` there one level up (see ``age.lua``). Returns
        how many moved."""
        return int(self._age(args=[self.prefix, time.time(), aging_s, limit]))

    def queues(self) -> list[str]:
        """The Celery queues tasks were pushed to."""
        return sorted(q.decode() for q in self.client.smembers(self.keys.queues))  # type: ignore[union-attr]

    def scan_lost(self, queue: str, head_n: int = 10, limit: int = 100) -> list[tuple[str, bytes]]:
        """QUEUED tasks whose message has left ``queue`` without being claimed, as (id, position score)."""
        reply = self._scan_lost(args=[self.prefix, queue, head_n, limit])
        return [(reply[i].decode(), reply[i + 1]) for i in range(0, len(reply), 2)]

    def requeue_lost(self, task_id: str, queue: str, score: bytes, envelope_for: EnvelopeFor) -> bool:
        """Push a lost task's message again, at the head of its queue, if it is still as the scan saw it."""
        pairs = self._envelopes([task_id], envelope_for)
        if not pairs:
            return False
        args: list[Any] = [self.prefix, score, pairs[0][1], queue, time.time(), self.aging_s]
        return bool(self._requeue_lost(keys=[self.keys.task(task_id)], args=args))

    def move_queued(
        self, task_ids: list[str], from_queue: str, to_queue: str, envelope_for: EnvelopeFor, pools: tuple[str, str]
    ) -> int:
        """Hand QUEUED tasks of ``from_queue`` over to ``to_queue`` (``pools``: from and to, for the overflow
        count), each if it is still waiting there; returns how many moved."""
        calls = self.stored_calls(task_ids)
        pipe = self.pipeline()
        for task_id, call in zip(task_ids, calls, strict=True):
            envelope = None if call is None else envelope_for(task_id, call[0], call[1], call[2], to_queue)
            if envelope is not None:
                self._move_queued(
                    keys=[self.keys.task(task_id)],
                    client=pipe,
                    args=[self.prefix, from_queue, to_queue, envelope, *pools, time.time(), self.aging_s],
                )
        return sum(pipe.execute())

    def counts(self, function: str) -> dict[str, int]:
        """Tasks per state (finished ones while their records are retained)."""
        pipe = self.pipeline()
        for state in State:
            pipe.zcard(self.keys.index(function, state))
        return {state.value: int(n) for state, n in zip(State, pipe.execute(), strict=True)}

    def running(self, *fields: str) -> list[tuple[str, list[bytes | None]]]:
        """Each task a worker holds RUNNING (a job waiting for its shards is held by none), as (id, its ``fields``):
        from the leases, which each of them holds, and the records. The tasks running are at most a few per GPU."""
        ids = [i.decode() for i in self.client.zrange(self.keys.leases, 0, -1)]  # type: ignore[union-attr]
        pipe = self.client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(self.keys.task(task_id), "state", *fields)
        return [(i, values[1:]) for i, values in zip(ids, pipe.execute(), strict=True) if values[0] == b"RUNNING"]

    def functions_seen(self) -> set[str]:
        return {m.decode() for m in self.client.smembers(self.keys.functions)}  # type: ignore[union-attr]

    def cancel(
        self,
        task_id: str,
        expect_attempts: int,
        error: dict[str, Any],
        dest: str,
        record: bytes,
        retention_s: int | None = None,
        expire: bool = False,
    ) -> tuple[str, str]:
        """Cancel: ``('cancelled', 'QUEUED')``, ``('signalled'|'already', 'RUNNING')``, ``('noop', final state)``,
        ``('missing', '')``, or ``('conflict', state)`` when the record changed since the caller read it. With
        ``expire``, a QUEUED task becomes EXPIRED instead (``('expired', 'QUEUED')``) and a running one is left
        alone (``noop``)."""
        outcome, state = self._finish_queued(
            keys=[self.keys.task(task_id), self.keys.delayed, self.keys.callbacks],
            args=[
                self.prefix,
                time.time(),
                expect_attempts,
                retention_s or self.retention_s,
                orjson.dumps(error),
                dest,
                record,
                "expire" if expire else "cancel",
            ],
        )
        return outcome.decode(), state.decode()

    def due_deadlines(self, limit: int = 100) -> list[str]:
        """Tasks whose max event age has passed: QUEUED ones are to expire, whether or not a worker serves them."""
        ids: list[bytes] = self.client.zrangebyscore(self.keys.deadlines, "-inf", time.time(), 0, limit)  # type: ignore[assignment]
        return [i.decode() for i in ids]

    def retry(self, task_id: str, envelope: bytes) -> tuple[str, str]:
        """Re-run a FAILED, TIMED_OUT, CANCELLED or EXPIRED task: ``('queued', old state)``, ``('missing', '')``
        or ``('conflict', state)``."""
        outcome, state = self._retry_now(keys=[self.keys.task(task_id)], args=[self.prefix, time.time(), envelope])
        return outcome.decode(), state.decode()

    def waiting(self, queues: list[str]) -> list[int]:
        """How many tasks wait in each of ``queues``, in one round trip."""
        pipe = self.pipeline()
        for queue in queues:
            pipe.zcard(self.keys.pending(queue))
        return [int(n) for n in pipe.execute()]

    def position(self, task_id: str, queue: str) -> tuple[int, int] | None:
        """(tasks ahead of this one, queue length) in its queue, or None when it is not waiting there."""
        key = self.keys.pending(queue)
        pipe = self.pipeline()
        pipe.zrank(key, task_id)
        pipe.zcard(key)
        rank, length = pipe.execute()
        return None if rank is None else (int(rank), int(length))

    def list_ids(self, function: str, state: State, before: int | None, limit: int) -> list[tuple[int, str]]:
        """Newest first: (seq, id) pairs with a seq below the ``before`` cursor."""
        top = "+inf" if before is None else f"({before}"
        rows: list[tuple[bytes, float]] = self.client.zrevrangebyscore(  # type: ignore[assignment]
            self.keys.index(function, state), top, "-inf", start=0, num=limit, withscores=True
        )
        return [(int(score), member.decode()) for member, score in rows]

    def get_many(self, task_ids: list[str]) -> list[dict[str, Any] | None]:
        """The records a listing shows, reading only the fields it shows (never the event)."""
        pipe = self.pipeline()
        for task_id in task_ids:
            pipe.hmget(self.keys.task(task_id), VIEW_FIELDS)
        out: list[dict[str, Any] | None] = []
        for task_id, values in zip(task_ids, pipe.execute(), strict=True):
            raw = {k: v for k, v in zip(VIEW_KEYS, values, strict=True) if v is not None}
            out.append(decode_record(raw, task_id) if raw else None)
        return out

    def drop_from_index(self, function: str, state: State, task_id: str) -> None:
        self.client.zrem(self.keys.index(function, state), task_id)

    def trim_index(self, limit: int = 200) -> int:
        return int(self._trim(args=[self.prefix, limit]))
