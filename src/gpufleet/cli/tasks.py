"""Control-plane commands: invoke, status, cancel, retry, tasks, queue, functions, gpus.

They talk to Redis through :class:`~gpufleet.control.plane.ControlPlane`, reading the same fleet file as the fleet, so
they work without the HTTP API running. With ``--json`` each prints exactly one JSON document on stdout (an error
too, as ``{"error": {"code", "message"}}``). Exit codes: 0 done; 1 not found, conflict, or the task finished
without succeeding; 2 bad input or configuration; 3 ``--timeout`` passed first; 130 interrupted.

Heavy imports (Redis, Celery, the fleet's functions) happen inside the commands, so ``gpufleet dev`` and
``--help`` stay quick.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from gpufleet.cli.output import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    print_json,
    seconds,
    table,
)
from gpufleet.cli.progress import ProgressDisplay, follow
from gpufleet.cli.views import render_status
from gpufleet.errors import BrokerError, InvalidRequestError, unreachable_hint
from gpufleet.registry.messages import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY

if TYPE_CHECKING:
    from gpufleet.control.plane import ControlPlane

Handler = Callable[[argparse.Namespace], int]


class AddCommand(Protocol):
    def __call__(self, name: str, func: Handler, help: str) -> argparse.ArgumentParser: ...


def add_commands(command: AddCommand) -> None:
    """Register the control-plane commands with the parser's ``command`` helper (which adds ``--config``)."""
    p = command("invoke", _invoke, "queue a task for FUNCTION and print its id; --wait follows it to the end")
    p.add_argument("function")
    p.add_argument("--payload", default="{}", metavar="JSON|@FILE|-",
                   help="the event: JSON text, @FILE to read a file, - to read stdin (default: {})")  # fmt: skip
    p.add_argument("--idempotency-key", metavar="KEY",
                   help="invoking again with the same key gives the same task instead of queueing another")  # fmt: skip
    p.add_argument(
        "--priority",
        type=int,
        default=DEFAULT_PRIORITY,
        choices=range(MIN_PRIORITY, MAX_PRIORITY + 1),
        metavar="0-9",
        help=f"higher runs first in the function's queue (default {DEFAULT_PRIORITY})",
    )
    _follow_args(p, "--wait", "follow the task until it finishes, then print its status; exit 0 if it succeeded")
    _json_arg(p, "print {id, created}; with --wait, the final status (plus created)")

    p = command("status", _status, "show a task: state, attempts, times, worker and GPU, progress, result or error")
    p.add_argument("task_id")
    _follow_args(p, "--watch", "follow the task live until it finishes; exit 0 if it succeeded")
    _json_arg(p, "print the task as JSON")

    p = command("cancel", _cancel, "cancel a task: at once if queued; a running one is asked to stop (then killed)")
    p.add_argument("task_id")
    _json_arg(p, "print {id, outcome, state}")

    p = command("retry", _retry, "run a FAILED, TIMED_OUT, CANCELLED or EXPIRED task again, from attempt 1")
    p.add_argument("task_id")
    _follow_args(p, "--wait", "follow the task until it finishes; exit 0 if it succeeded")
    _json_arg(p, "print {id, outcome, previous_state, state}; with --wait, the final status")

    p = command("tasks", _tasks, "list tasks, newest first, one page at a time")
    p.add_argument("--function", help="only this function's tasks")
    p.add_argument("--state", help="only tasks in this state (QUEUED, RUNNING, SUCCEEDED, FAILED, ...)")
    p.add_argument("--limit", type=int, default=20, help="tasks per page (default: 20)")
    p.add_argument("--cursor", help="the next page: the cursor the previous page printed")
    _json_arg(p, "print {items, next_cursor}")

    p = command("queue", _queue, "queue length and tasks per state, for one function or every served one")
    p.add_argument("function", nargs="?")
    _json_arg(p, "print the counts (a list of them without FUNCTION)")

    p = command("functions", _functions, "list the served functions and their policies")
    _json_arg(p, "print the functions, with their payload schemas")

    p = command("alias", _alias, "show a function's aliases, or point one at versions (e.g. alias embed prod 3=0.9 "
                "4=0.1); every change is logged")  # fmt: skip
    p.add_argument("function")
    p.add_argument("alias", nargs="?", help="the alias to set (omit it to list them)")
    p.add_argument("weights", nargs="*", metavar="VERSION=WEIGHT", help="the versions it stands for, with weights")
    _json_arg(p, "print {alias: {version: weight}}")

    p = command("gpus", _gpus, "list the fleet's GPUs: memory, utilisation, the task each runs, stale entries")
    _json_arg(p, "print the inventory entries")

    p = command("parked", _parked, "records a destination refused for good: list, re-send or drop them")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--resend", nargs="+", metavar="ID", help="send these parked records again")
    act.add_argument("--resend-all", action="store_true", help="send every parked record again")
    act.add_argument("--drop", nargs="+", metavar="ID", help="forget these parked records")
    p.add_argument("--limit", type=int, default=20, help="records per page (default: 20)")
    p.add_argument("--after", metavar="ID", help="the next page: the id of the last record shown")
    _json_arg(p, "print {items, total}, or {count} for --resend/--drop")


def _json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"machine-readable output: {what}")


def _follow_args(p: argparse.ArgumentParser, flag: str, what: str) -> None:
    p.add_argument(flag, action="store_true", dest="follow", help=what)
    p.add_argument("--timeout", type=_positive, metavar="S",
                   help=f"stop following after S seconds (exit 3 if not finished by then); implies {flag}")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr while following")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _control(func: Handler) -> Handler:
    """A command that reaches Redis: an unreachable server is a clear one-line error, not a traceback."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from gpufleet.registry.model import REDIS_ERRORS

        try:
            return func(args)
        except REDIS_ERRORS as exc:
            raise BrokerError(f"cannot reach Redis: {exc} ({unreachable_hint('Redis', 'redis.url')})") from exc

    return run


def _plane(args: argparse.Namespace) -> ControlPlane:
    from gpufleet.config import load_fleet
    from gpufleet.control.plane import ControlPlane
    from gpufleet.logs import configure_logging

    fleet = load_fleet(args.config, secrets=False)  # control reads Redis: it signs and checks nothing
    logging = fleet.settings.logging
    # Logs go to stderr, never into a --json document; a command line wants warnings, not the fleet's info chatter.
    quiet = logging.model_copy(update={"level": "error" if logging.level == "error" else "warning"})
    configure_logging(quiet, role="cli")
    return ControlPlane(fleet)


def read_payload(spec: str, stdin: Any = None) -> Any:
    """``--payload``: JSON text, ``@FILE``, or ``-`` for stdin.

    Raises:
        InvalidRequestError: the file cannot be read or the text is not JSON (exit 2).
    """
    where = "--payload"
    if spec == "-":
        where = "--payload - (stdin)"
        raw: str | bytes = (stdin or sys.stdin.buffer).read()
    elif spec.startswith("@"):
        where = f"--payload file {spec[1:]!r}"
        try:
            raw = Path(spec[1:]).read_bytes()
        except OSError as exc:
            raise InvalidRequestError("bad_payload", f"cannot read {where}: {exc.strerror or exc}") from None
    else:
        raw = spec
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError("bad_payload", f"{where} is not valid JSON: {exc}") from None


# -- task commands -----------------------------------------------------------------------------------------------


@_control
def _invoke(args: argparse.Namespace) -> int:
    event = read_payload(args.payload)  # before loading the fleet: a typo fails fast
    plane = _plane(args)
    invocation = plane.invoke(args.function, event, args.idempotency_key, priority=args.priority)
    if not invocation.created:
        print(f"gpufleet: task {invocation.id} already exists for this idempotency key; not queued again",
              file=sys.stderr)  # fmt: skip
    if not (args.follow or args.timeout):
        if args.json:
            print_json({"id": invocation.id, "created": invocation.created})
        else:
            print(invocation.id)
        return EXIT_OK
    if not args.quiet:
        print(f"task {invocation.id}", file=sys.stderr)
    return _follow(args, plane, invocation.id, {"created": invocation.created})


@_control
def _status(args: argparse.Namespace) -> int:
    plane = _plane(args)
    if args.follow or args.timeout:
        return _follow(args, plane, args.task_id)
    view = plane.status(args.task_id)
    if args.json:
        print_json(view)
    else:
        print(render_status(view, plane))
    return EXIT_OK


@_control
def _cancel(args: argparse.Namespace) -> int:
    plane = _plane(args)
    out = plane.cancel(args.task_id)
    if args.json:
        print_json(out)
    elif out["outcome"] == "cancelled":
        print(f"cancelled: {out['id']} was queued and will not run")
    elif out["outcome"] == "cancelling":
        grace = plane.fleet.settings.worker.cancel_grace_s
        print(f"cancelling: {out['id']} is running; asked to stop, and killed if still running after {grace:g}s")
    else:
        print(f"noop: {out['id']} already finished ({out['state']}); nothing to cancel")
    return EXIT_OK


@_control
def _retry(args: argparse.Namespace) -> int:
    plane = _plane(args)
    out = plane.retry(args.task_id)
    if args.follow or args.timeout:
        if not args.quiet:
            print(f"task {out['id']} queued again (was {out['previous_state']})", file=sys.stderr)
        return _follow(args, plane, out["id"])
    if args.json:
        print_json(out)
    else:
        print(f"queued: {out['id']} (was {out['previous_state']}) runs again from attempt 1")
    return EXIT_OK


def _follow(args: argparse.Namespace, plane: ControlPlane, task_id: str, extra: dict[str, Any] | None = None) -> int:
    """Follow the task to its end, then print its status: exit 0 if it succeeded, 1 if not, 3 on --timeout."""
    from gpufleet.registry.model import TERMINAL

    display = None if args.quiet else ProgressDisplay(sys.stderr)
    try:
        view, timed_out = follow(lambda: plane.status(task_id), TERMINAL, display, args.timeout)
    except KeyboardInterrupt:
        print(f"gpufleet: stopped following {task_id}; the task goes on (gpufleet cancel {task_id} stops it)",
              file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    if args.json:
        print_json({**view, **(extra or {})})
    else:
        print(render_status(view, plane))
    if timed_out:
        print(f"gpufleet: timed out after {args.timeout:g}s; task {task_id} is still {view['state']}",
              file=sys.stderr)  # fmt: skip
        return EXIT_TIMEOUT
    return EXIT_OK if view["state"] == "SUCCEEDED" else EXIT_FAILED


# -- listings ----------------------------------------------------------------------------------------------------


@_control
def _tasks(args: argparse.Namespace) -> int:
    plane = _plane(args)
    page = plane.tasks(args.function, args.state, args.limit, args.cursor)
    if args.json:
        print_json(page)
        return EXIT_OK
    rows = [
        [t["id"], t["function"], t["state"], f"{t['attempts']}/{t['max_attempts']}", _percent(t), t["created_at"],
         t.get("worker")]
        for t in page["items"]
    ]  # fmt: skip
    print(table(["id", "function", "state", "attempts", "progress", "created", "worker"], rows, "no tasks"))
    if page["next_cursor"]:
        again = [f"--{k} {v}" for k, v in (("function", args.function), ("state", args.state)) if v]
        if args.limit != 20:
            again.append(f"--limit {args.limit}")
        print(f"\nmore: gpufleet tasks {' '.join([*again, '--cursor', page['next_cursor']])}")
    return EXIT_OK


def _percent(view: dict[str, Any]) -> str:
    fraction = float((view.get("progress") or {}).get("fraction") or 0.0)
    return f"{fraction:.0%}" if fraction or view["state"] == "RUNNING" else "-"


@_control
def _alias(args: argparse.Namespace) -> int:
    plane = _plane(args)
    if args.alias is None:
        aliases = plane.aliases(args.function)
    else:
        weights: dict[str, float] = {}
        for item in args.weights:
            version, _, weight = item.partition("=")
            try:
                weights[version] = float(weight)
            except ValueError:
                raise InvalidRequestError("bad_weights", f"{item!r}: use VERSION=WEIGHT, e.g. 4=0.1") from None
        who = f"cli:{getpass.getuser()}@{socket.gethostname()}"
        aliases = plane.set_alias(args.function, args.alias, weights, by=who)
    if args.json:
        print_json(aliases)
        return EXIT_OK
    rows = [[alias, _weights_text(ws)] for alias, ws in sorted(aliases.items())]
    print(table(["alias", "versions"], rows, f"no aliases: {args.function} goes to any version it runs as"))
    return EXIT_OK


@_control
def _queue(args: argparse.Namespace) -> int:
    plane = _plane(args)
    names = [args.function] if args.function else sorted(plane.fleet.functions)  # names only: no state to read
    queues = [plane.queue(name) for name in names]
    if args.json:
        print_json(queues[0] if args.function else queues)
        return EXIT_OK
    states = ["RUNNING", "SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED", "EXPIRED"]  # length: the QUEUED count
    rows = [[q["function"], q["queue"], q["length"], ", ".join(f"{v}: {n}" for v, n in q["versions"].items()),
             *(q["counts"].get(s, 0) for s in states), "" if q["served"] else "no live worker consumes this queue"]
            for q in queues]  # fmt: skip
    headers = ["function", "queue", "length", "versions", *(s.lower() for s in states), "note"]
    print(table(headers, rows, "no functions served"))
    return EXIT_OK


@_control
def _functions(args: argparse.Namespace) -> int:
    plane = _plane(args)
    functions = plane.functions()
    if args.json:
        print_json(functions)
        return EXIT_OK
    rows = []
    for fn in functions:
        gpu = fn["gpu"]
        model = f"{gpu['model']} x{gpu['count']}" if gpu.get("count", 1) != 1 else gpu["model"]
        pools = ",".join(gpu.get("pools") or [])
        gpu_text = f"{model} ({pools})" if pools else model
        if fn.get("job"):  # split and merge run there; the shards where their function says
            gpu_text += f"; job of {fn['job']['shard']}"
        rows.append([fn["name"], _versions_text(fn), _aliases_text(fn["aliases"]), gpu_text, fn["queue"],
                     seconds(fn["timeout_s"]), fn["max_attempts"], seconds(fn["max_event_age_s"])])  # fmt: skip
    print(table(["name", "versions", "aliases", "gpu", "queue", "timeout", "attempts", "max event age"], rows,
                "no functions served"))  # fmt: skip
    return EXIT_OK


def _versions_text(fn: dict[str, Any]) -> str:
    """``3* ACTIVE, 4 DEPLOYING`` (* the version declared here), or the declared one alone when Redis is down."""
    if fn["versions"] is None:
        return f"{fn['version']}* ?"
    return ", ".join(f"{v['version']}{'*' if v['declared'] else ''} {v['state']}" for v in fn["versions"])


def _weights_text(weights: dict[str, float]) -> str:
    """``3: 90%, 4: 10%``."""
    return ", ".join(f"{v}: {w / sum(weights.values()):.0%}" for v, w in weights.items())


def _aliases_text(aliases: dict[str, dict[str, float]]) -> str:
    """``prod (3: 90%, 4: 10%); beta (4: 100%)``."""
    return "; ".join(f"{alias} ({_weights_text(ws)})" for alias, ws in sorted(aliases.items()))


@_control
def _gpus(args: argparse.Namespace) -> int:
    from gpufleet.control.views import group_gpus

    plane = _plane(args)
    entries = plane.gpus()
    if args.json:
        print_json(entries)
        return EXIT_OK
    if not entries:
        print("no GPUs reported yet (a worker's supervisor publishes its GPUs every few seconds)")
        return EXIT_OK
    groups = [[g["pool"], g["model"], g["gpus"], g["busy"], g["idle"], g["stale"], ", ".join(g["hosts"])]
              for g in group_gpus(entries)]  # fmt: skip
    print(table(["pool", "model", "gpus", "busy", "idle", "stale", "hosts"], groups))
    print()
    rows = [[e.get("worker"), e.get("index"), _gpu_model(e), ",".join(e.get("pools") or []), _memory(e),
             _utilisation(e), e.get("task_id"), _gpu_state(e)] for e in entries]  # fmt: skip
    print(table(["worker", "index", "model", "pools", "memory", "util", "task", "state"], rows))
    return EXIT_OK


def _gpu_model(entry: dict[str, Any]) -> str:
    model = str(entry.get("model") or entry.get("name") or "?")
    return f"{model} (virtual)" if entry.get("virtual") else model


def _memory(entry: dict[str, Any]) -> str:
    used, total = entry.get("memory_used_mb"), entry.get("memory_total_mb")
    if used is None and not total:
        return "-"
    return f"{'-' if used is None else used}/{total or '?'} MiB"


def _utilisation(entry: dict[str, Any]) -> str:
    util = entry.get("utilization_pct")
    return "-" if util is None else f"{util}%"


def _gpu_state(entry: dict[str, Any]) -> str:
    if entry.get("stale"):
        return "stale"
    if entry.get("up") is False:
        return "down"
    return "busy" if entry.get("task_id") else "idle"


@_control
def _parked(args: argparse.Namespace) -> int:
    plane = _plane(args)
    if args.resend or args.resend_all or args.drop:
        if args.drop:
            count, done = plane.drop_parked(args.drop), "dropped"
        else:
            count, done = plane.resend_parked(None if args.resend_all else args.resend), "re-sent"
        print_json({"count": count}) if args.json else print(f"{done} {count}")
        return EXIT_OK
    page = plane.parked(args.limit, args.after)
    if args.json:
        print_json(page)
        return EXIT_OK
    rows = [[r["id"], r["destination"], r["key"], r["bytes"], r["reason"][:60]] for r in page["items"]]
    print(table(["id", "destination", "key", "bytes", "reason"], rows, "no parked records"))
    if len(page["items"]) < page["total"] and page["items"]:
        print(f"\n{page['total']} in all; more: gpufleet parked --after {page['items'][-1]['id']}")
    return EXIT_OK
