"""Task commands: invoke, status, cancel, retry, tasks (the fleet's own are in :mod:`gpufleet.cli.fleet`).

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
    p.add_argument(
        "--payload",
        default="{}",
        metavar="JSON|@FILE|-",
        help="the event: JSON text, @FILE to read a file, - to read stdin (default: {})",
    )
    p.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="invoking again with the same key gives the same task instead of queueing another",
    )
    p.add_argument(
        "--priority",
        type=int,
        default=DEFAULT_PRIORITY,
        choices=range(MIN_PRIORITY, MAX_PRIORITY + 1),
        metavar="0-9",
        help=f"higher runs first in the function's queue (default {DEFAULT_PRIORITY})",
    )
    _follow_args(p, "--wait", "follow the task until it finishes, then print its status; exit 0 if it succeeded")
    json_arg(p, "print {id, created}; with --wait, the final status (plus created)")

    p = command("status", _status, "show a task: state, attempts, times, worker and GPU, progress, result or error")
    p.add_argument("task_id")
    _follow_args(p, "--watch", "follow the task live until it finishes; exit 0 if it succeeded")
    json_arg(p, "print the task as JSON")

    p = command("cancel", _cancel, "cancel a task: at once if queued; a running one is asked to stop (then killed)")
    p.add_argument("task_id")
    json_arg(p, "print {id, outcome, state}")

    p = command("retry", _retry, "run a FAILED, TIMED_OUT, CANCELLED or EXPIRED task again, from attempt 1")
    p.add_argument("task_id")
    _follow_args(p, "--wait", "follow the task until it finishes; exit 0 if it succeeded")
    json_arg(p, "print {id, outcome, previous_state, state}; with --wait, the final status")

    p = command("tasks", _tasks, "list tasks, newest first, one page at a time")
    p.add_argument("--function", help="only this function's tasks")
    p.add_argument("--state", help="only tasks in this state (QUEUED, RUNNING, SUCCEEDED, FAILED, ...)")
    p.add_argument("--limit", type=int, default=20, help="tasks per page (default: 20)")
    p.add_argument("--cursor", help="the next page: the cursor the previous page printed")
    json_arg(p, "print {items, next_cursor}")


def json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"machine-readable output: {what}")


def _follow_args(p: argparse.ArgumentParser, flag: str, what: str) -> None:
    p.add_argument(flag, action="store_true", dest="follow", help=what)
    p.add_argument(
        "--timeout",
        type=_positive,
        metavar="S",
        help=f"stop following after S seconds (exit 3 if not finished by then); implies {flag}",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr while following")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def control_command(func: Handler) -> Handler:
    """A command that reaches Redis: an unreachable server is a clear one-line error, not a traceback."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from gpufleet.registry.model import REDIS_ERRORS

        try:
            return func(args)
        except REDIS_ERRORS as exc:
            raise BrokerError(f"cannot reach Redis: {exc} ({unreachable_hint('Redis', 'redis.url')})") from exc

    return run


def plane_of(args: argparse.Namespace) -> ControlPlane:
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


@control_command
def _invoke(args: argparse.Namespace) -> int:
    event = read_payload(args.payload)  # before loading the fleet: a typo fails fast
    plane = plane_of(args)
    invocation = plane.invoke(args.function, event, args.idempotency_key, priority=args.priority)
    if not invocation.created:
        print(
            f"gpufleet: task {invocation.id} already exists for this idempotency key; not queued again", file=sys.stderr
        )
    if not (args.follow or args.timeout):
        if args.json:
            print_json({"id": invocation.id, "created": invocation.created})
        else:
            print(invocation.id)
        return EXIT_OK
    if not args.quiet:
        print(f"task {invocation.id}", file=sys.stderr)
    return _follow(args, plane, invocation.id, {"created": invocation.created})


@control_command
def _status(args: argparse.Namespace) -> int:
    plane = plane_of(args)
    if args.follow or args.timeout:
        return _follow(args, plane, args.task_id)
    view = plane.status(args.task_id)
    if args.json:
        print_json(view)
    else:
        print(render_status(view, plane))
    return EXIT_OK


@control_command
def _cancel(args: argparse.Namespace) -> int:
    plane = plane_of(args)
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


@control_command
def _retry(args: argparse.Namespace) -> int:
    plane = plane_of(args)
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
        print(
            f"gpufleet: stopped following {task_id}; the task goes on (gpufleet cancel {task_id} stops it)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if args.json:
        print_json({**view, **(extra or {})})
    else:
        print(render_status(view, plane))
    if timed_out:
        print(f"gpufleet: timed out after {args.timeout:g}s; task {task_id} is still {view['state']}", file=sys.stderr)
        return EXIT_TIMEOUT
    return EXIT_OK if view["state"] == "SUCCEEDED" else EXIT_FAILED


# -- listings ----------------------------------------------------------------------------------------------------


@control_command
def _tasks(args: argparse.Namespace) -> int:
    plane = plane_of(args)
    page = plane.tasks(args.function, args.state, args.limit, args.cursor)
    if args.json:
        print_json(page)
        return EXIT_OK
    rows = [
        [
            t["id"],
            t["function"],
            t["state"],
            f"{t['attempts']}/{t['max_attempts']}",
            _percent(t),
            t["created_at"],
            t.get("worker"),
        ]
        for t in page["items"]
    ]
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
