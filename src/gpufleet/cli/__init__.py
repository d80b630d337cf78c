"""The ``gpufleet`` command line. Signal handlers are installed here, in the entry point, and nowhere else.

This module runs the fleet's roles (``run``, ``worker``, ``trigger``, ``dispatcher``, ``api``) and the local tools
(``check``, ``token``, ``dev``, ``demo``); :mod:`gpufleet.cli.tasks` holds the control-plane commands (``invoke``,
``status``, ``cancel``, ``retry``, ``tasks``, ``queue``, ``functions``, ``gpus``).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from gpufleet import __version__
from gpufleet.cli.fleet import add_commands as add_fleet_commands
from gpufleet.cli.init import cmd_init
from gpufleet.cli.output import report_error
from gpufleet.cli.records import add_commands as add_record_commands
from gpufleet.cli.tasks import add_commands as add_control_commands
from gpufleet.errors import GpufleetError

if TYPE_CHECKING:
    from gpufleet.config import Fleet


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except GpufleetError as exc:
        code = report_error(exc, as_json=getattr(args, "json", False))
    raise SystemExit(code or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufleet", description="Self-hosted, event-driven GPU worker fleet.")
    parser.add_argument("--version", action="version", version=f"gpufleet {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--config", type=Path, default=None, help="fleet file (default: $GPUFLEET_CONFIG or config/fleet.yaml)"
        )
        p.set_defaults(func=func)
        return p

    command("run", _run, "run every role (dispatcher, worker, api, trigger) on this machine; Ctrl-C stops all")
    command("worker", _worker, "run one Celery worker process per GPU (or virtual GPU)")
    p = command("trigger", _trigger, "run the triggers of triggers/*.yaml")
    p.add_argument("--name", action="append", help="run only this trigger (repeatable)")
    command("dispatcher", _dispatcher, "deliver callback records to their destinations")
    command("api", _api, "serve the HTTP control plane (api.host:api.port)")
    command("check", _check, "validate the configuration, functions and triggers, and print a summary")
    add_control_commands(command)
    add_fleet_commands(command)
    add_record_commands(command)
    p = sub.add_parser("dev", help="start/stop local Redis, Kafka and moto (S3/SQS/SNS) on free loopback ports")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument(
        "--sentinel",
        action="store_true",
        help="up: Redis as a Sentinel group (master, replica, 3 sentinels), to try a failover",
    )
    p.set_defaults(func=_dev)
    p = sub.add_parser("init", help="write a starter project: a commented config/fleet.yaml, a trigger and a function")
    p.add_argument("dir", nargs="?", default=".", help="where (default: this folder)")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("token", help="print a new random secret for api.token, a webhook token or an HMAC secret")
    p.set_defaults(func=_token)
    p = sub.add_parser("demo", help="run the demo end to end on embedded local services")
    p.add_argument("--config", type=Path, default=Path("config/fleet.yaml"))
    p.set_defaults(func=_demo)
    return parser


def _fleet(args: argparse.Namespace, role: str) -> Fleet:
    from gpufleet.config import load_fleet
    from gpufleet.logs import configure_logging

    fleet = load_fleet(args.config)
    configure_logging(fleet.settings.logging, role=role)
    return fleet


def _run(args: argparse.Namespace) -> int:
    from gpufleet.roles import ROLE_ORDER, ProcessTree, announce_when_ready, stop_event_on_signals

    fleet = _fleet(args, "run")
    roles = tuple(r for r in ROLE_ORDER if r != "api" or fleet.settings.api.enabled)
    if "api" in roles:
        from gpufleet.api import check_port_free

        fleet.settings.api.require_token(str(fleet.config_file))  # now, not in a role restarted for ever
        check_port_free(fleet)
    stop = stop_event_on_signals()
    threading.Thread(target=announce_when_ready, args=(fleet, roles, stop), daemon=True).start()
    return ProcessTree(fleet.config_file, roles, shutdown_grace_s=fleet.settings.worker.shutdown_grace_s).run(stop)


def _worker(args: argparse.Namespace) -> int:
    from gpufleet.roles import stop_event_on_signals
    from gpufleet.worker.supervisor import Supervisor

    fleet = _fleet(args, "worker")
    Supervisor(fleet).run(stop_event_on_signals())
    return 0


def _trigger(args: argparse.Namespace) -> int:
    from gpufleet.roles import stop_event_on_signals
    from gpufleet.triggers import backend, served_by
    from gpufleet.triggers.base import Trigger, keep_freed_memory

    fleet = _fleet(args, "trigger")
    names = args.name or [n for n, t in fleet.triggers.items() if t.enabled]
    unknown = sorted(set(names) - set(fleet.triggers))
    if unknown:
        raise GpufleetError(f"unknown trigger(s) {unknown}; configured: {sorted(fleet.triggers)}")
    names = [n for n in names if served_by(fleet.triggers[n].scheme) == "trigger"]  # webhooks: `gpufleet api`
    stop = stop_event_on_signals()
    if not names:
        # Nothing to consume here; stay up (an exit would look like a crash to `gpufleet run`).
        structlog.get_logger("gpufleet.trigger").info("no triggers to run in this process")
        stop.wait()
        return 0
    keep_freed_memory()
    # Built here, before any thread starts: a trigger that cannot be built fails the process now.
    triggers = [backend(fleet.triggers[name].scheme)(fleet, fleet.triggers[name]) for name in names]
    failed: list[str] = []

    def serve(trigger: Trigger) -> None:
        try:
            trigger.run(stop)
        except Exception as exc:  # whatever killed it, the process must not run on without it
            # One dead trigger stops the process (exit 1) so that `gpufleet run` or the orchestrator restarts it,
            # instead of running on with a source nobody consumes. A known cause (a server out of reach) is one
            # line that says what to check; anything else comes with its traceback.
            log = structlog.get_logger("gpufleet.trigger")
            if isinstance(exc, GpufleetError):
                log.error("trigger failed", trigger=trigger.name, error=str(exc))
            else:
                log.exception("trigger failed", trigger=trigger.name)
            failed.append(trigger.name)
            stop.set()

    threads = [threading.Thread(target=serve, args=(t,), name=f"trigger-{t.name}") for t in triggers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 1 if failed else 0


def _dispatcher(args: argparse.Namespace) -> int:
    from gpufleet.delivery.dispatcher import Dispatcher
    from gpufleet.roles import stop_event_on_signals

    fleet = _fleet(args, "dispatcher")
    Dispatcher(fleet).run(stop_event_on_signals())
    return 0


def _api(args: argparse.Namespace) -> int:
    from gpufleet.api.server import serve
    from gpufleet.roles import stop_event_on_signals

    fleet = _fleet(args, "api")
    serve(fleet, stop_event_on_signals())
    return 0


def _check(args: argparse.Namespace) -> int:
    from gpufleet.config import load_fleet
    from gpufleet.credentials import redact_url

    fleet = load_fleet(args.config)
    print(f"config: {fleet.config_file}")
    for fn in fleet.functions.values():
        print(
            f"function {fn.name}: gpu={fn.gpu.model} pools={list(fn.gpu.pools)} timeout_s={fn.timeout_s:g} "
            f"max_attempts={fn.max_attempts} ({fn.source_file})"
        )
    backlogs = _backlogs(fleet)
    for t in fleet.triggers.values():
        off = "" if t.enabled else "  [disabled: enabled: false, not run]"
        print(
            f"trigger {t.name}: {redact_url(t.source)} -> {t.function or '(function named by each message)'}{off}"
            f"{backlogs.get(t.name, '')}"
        )
    return 0


def _backlogs(fleet: Fleet) -> dict[str, str]:
    """What each running trigger last reported of its source's backlog, if Redis answers at once."""
    import time

    from gpufleet.registry import connection
    from gpufleet.registry.keyspace import Keyspace
    from gpufleet.registry.snapshot import LAG_STALE_S

    try:
        client = connection.client(fleet.settings.redis.url, socket_timeout=1, socket_connect_timeout=1)
        raw: Any = client.hgetall(Keyspace(fleet.settings.redis.key_prefix).metric("trigger_lag"))
    except Exception:  # noqa: BLE001 - check validates the configuration; the backlog is a bonus
        return {}
    out = {}
    for name, value in raw.items():
        report = orjson.loads(value)
        age = time.time() - float(report.get("at", 0))
        values: dict[str, int] = report.get("values", {})
        if age > LAG_STALE_S:
            continue
        if report.get("kind") == "partition":
            text = f"consumer lag {sum(values.values())} over {len(values)} partitions"
        else:
            text = ", ".join(f"{k} {v}" for k, v in sorted(values.items()))
        out[name.decode()] = f"  [backlog: {text}, {age:.0f} s ago]"
    return out


def _dev(args: argparse.Namespace) -> int:
    """``eval "$(gpufleet dev up)"`` works: the exports alone go to stdout, what is running to stderr."""
    import shlex

    from gpufleet.dev import require_local, state_dir
    from gpufleet.dev.stack import dev_down, dev_exports, dev_status, dev_up

    where = state_dir(os.environ)
    if args.action == "up":
        require_local("dev up")
        state = dev_up(where, sentinel=args.sentinel)
        started, lost = state["started"], state["lost"]
        amqp = f"amqp   {state['amqp_url']}\n" if "amqp_url" in state else ""
        print(
            f"redis  {state['redis_url']}\nkafka  {state['kafka_bootstrap']}\n"
            f"s3     {state['moto_url']}  (moto: S3, SQS and SNS; any credentials)\n{amqp}state  {where}\n"
            + (f"started {', '.join(started)}" if started else "all were running: nothing started"),
            file=sys.stderr,
        )
        if state["down"]:
            print(
                f"sentinel group members down: {', '.join(state['down'])} (not restarted: the group fails over "
                "without them; `gpufleet dev down`, then `gpufleet dev up --sentinel` for a new group)",
                file=sys.stderr,
            )
        for name in lost:
            print(
                f"{name} was down and is restarted on its old port, empty: it kept its data in memory (its "
                "topics, buckets or queues are gone; make them again)",
                file=sys.stderr,
            )
        print("export " + " ".join(f"{name}={shlex.quote(value)}" for name, value in dev_exports(state).items()))
    elif args.action == "down":
        print("stopped" if dev_down(where) else "nothing was running", file=sys.stderr)
    else:
        status = dev_status(where)
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode() if status else "not running")
    return 0


def _token(args: argparse.Namespace) -> int:
    import secrets

    print(secrets.token_urlsafe(32))  # 256 bits, in the characters a Bearer header carries
    return 0


def _demo(args: argparse.Namespace) -> int:
    from gpufleet.dev import require_local

    require_local("demo")  # before the demo's own imports: a missing extra is one line, not a traceback
    from gpufleet.demo import run_demo

    return run_demo(args.config)
