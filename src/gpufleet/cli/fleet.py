"""Fleet commands: queue, functions, alias, gpus, usage, parked. As the task commands (:mod:`gpufleet.cli.tasks`), they
read Redis through the control plane, without the HTTP API, and print one JSON document with ``--json``.
"""

from __future__ import annotations

import argparse
import getpass
import socket
from typing import Any

from gpufleet.cli.output import EXIT_OK, print_json, seconds, table
from gpufleet.cli.tasks import AddCommand, control_command, json_arg, plane_of
from gpufleet.errors import InvalidRequestError


def add_commands(command: AddCommand) -> None:
    """Register the fleet commands with the parser's ``command`` helper (which adds ``--config``)."""
    p = command("queue", _queue, "queue length and tasks per state, for one function or every served one")
    p.add_argument("function", nargs="?")
    json_arg(p, "print the counts (a list of them without FUNCTION)")

    p = command("functions", _functions, "list the served functions and their policies")
    json_arg(p, "print the functions, with their payload schemas")

    p = command(
        "alias",
        _alias,
        "show a function's aliases, or point one at versions (e.g. alias embed prod 3=0.9 "
        "4=0.1); every change is logged",
    )
    p.add_argument("function")
    p.add_argument("alias", nargs="?", help="the alias to set (omit it to list them)")
    p.add_argument("weights", nargs="*", metavar="VERSION=WEIGHT", help="the versions it stands for, with weights")
    json_arg(p, "print {alias: {version: weight}}")

    p = command("gpus", _gpus, "list the fleet's GPUs (memory, health, the tasks each runs), or cordon or uncordon one")
    p.add_argument("action", nargs="?", choices=["cordon", "uncordon"], help="take a GPU out of service, or back in")
    p.add_argument("worker", nargs="?", help="the GPU's worker, as gpufleet gpus names it (gpu0@host-a)")
    p.add_argument("--reason", default="", help="why (cordon): shown with the GPU")
    json_arg(p, "print the inventory entries (or the outcome)")

    p = command("usage", _usage, "GPU seconds, runs and cost by function, pool or GPU model, over the last hours")
    p.add_argument("--since", default="24h", help="how far back: 90m, 24h, 7d (whole hours; default: 24h)")
    p.add_argument("--by", choices=["function", "pool", "model"], default="function", help="default: function")
    json_arg(p, "print the rows")

    p = command("parked", _parked, "records a destination refused for good: list, re-send or drop them")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--resend", nargs="+", metavar="ID", help="send these parked records again")
    act.add_argument("--resend-all", action="store_true", help="send every parked record again")
    act.add_argument("--drop", nargs="+", metavar="ID", help="forget these parked records")
    p.add_argument("--limit", type=int, default=20, help="records per page (default: 20)")
    p.add_argument("--after", metavar="ID", help="the next page: the id of the last record shown")
    json_arg(p, "print {items, total}, or {count} for --resend/--drop")


@control_command
def _alias(args: argparse.Namespace) -> int:
    plane = plane_of(args)
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


@control_command
def _queue(args: argparse.Namespace) -> int:
    plane = plane_of(args)
    names = [args.function] if args.function else sorted(plane.fleet.functions)  # names only: no state to read
    queues = [plane.queue(name) for name in names]
    if args.json:
        print_json(queues[0] if args.function else queues)
        return EXIT_OK
    states = ["RUNNING", "SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED", "EXPIRED"]  # length: the QUEUED count
    rows = [
        [
            q["function"],
            q["queue"],
            q["length"],
            ", ".join(f"{v}: {n}" for v, n in q["versions"].items()),
            *(q["counts"].get(s, 0) for s in states),
            "" if q["served"] else "no live worker consumes this queue",
        ]
        for q in queues
    ]
    headers = ["function", "queue", "length", "versions", *(s.lower() for s in states), "note"]
    print(table(headers, rows, "no functions served"))
    return EXIT_OK


@control_command
def _functions(args: argparse.Namespace) -> int:
    plane = plane_of(args)
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
        rows.append(
            [
                fn["name"],
                _versions_text(fn),
                _aliases_text(fn["aliases"]),
                gpu_text,
                fn["queue"],
                seconds(fn["timeout_s"]),
                fn["max_attempts"],
                seconds(fn["max_event_age_s"]),
            ]
        )
    print(
        table(
            ["name", "versions", "aliases", "gpu", "queue", "timeout", "attempts", "max event age"],
            rows,
            "no functions served",
        )
    )
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


@control_command
def _gpus(args: argparse.Namespace) -> int:
    from gpufleet.control.views import group_gpus

    plane = plane_of(args)
    if args.action:
        if not args.worker:
            raise InvalidRequestError(
                "bad_request", f"name the GPU to {args.action}: gpufleet gpus {args.action} WORKER"
            )
        done = plane.cordon(args.worker, args.reason) if args.action == "cordon" else plane.uncordon(args.worker)
        print_json(done) if args.json else print(f"{args.worker}: {args.action}ed")
        return EXIT_OK
    entries = plane.gpus()
    if args.json:
        print_json(entries)
        return EXIT_OK
    if not entries:
        print("no GPUs reported yet (a worker's supervisor publishes its GPUs every few seconds)")
        return EXIT_OK
    groups = [
        [g["pool"], g["model"], g["gpus"], g["busy"], g["idle"], g["stale"], ", ".join(g["hosts"])]
        for g in group_gpus(entries)
    ]
    print(table(["pool", "model", "gpus", "busy", "idle", "stale", "hosts"], groups))
    print()
    rows = [
        [
            e.get("worker"),
            e.get("index"),
            _gpu_model(e),
            ",".join(e.get("pools") or []),
            _memory(e),
            _utilisation(e),
            _tasks(e),
            _gpu_state(e),
        ]
        for e in entries
    ]
    print(table(["worker", "index", "model", "pools", "memory", "util", "task", "state"], rows))
    for e in entries:  # what a GPU's health says, under the table: too long for a column
        warnings = (e.get("health") or {}).get("warnings") or []
        if e.get("cordoned") or warnings:
            why = f"cordoned by {e['cordoned']['by']}: {e['cordoned']['reason']}" if e.get("cordoned") else ""
            print(f"{e['worker']}: " + "; ".join([w for w in [why, *warnings] if w]))
    for host in sorted({e["host"] for e in entries if e.get("host_draining") and not e["stale"]}):
        print(f"{host}: draining: every GPU cordoned, it takes no task until one is uncordoned")
    return EXIT_OK


def _tasks(entry: dict[str, Any]) -> str | None:
    """The task it runs, and how many more it holds (a batch's other events, or the next one claimed ahead)."""
    held = entry.get("task_ids") or ([entry["task_id"]] if entry.get("task_id") else [])
    if not held:
        return None
    return str(held[0]) + (f" (+{len(held) - 1})" if len(held) > 1 else "")


def _gpu_model(entry: dict[str, Any]) -> str:
    model = str(entry.get("model") or entry.get("name") or "?") + (f":{entry['mig']}" if entry.get("mig") else "")
    return f"{model} (virtual)" if entry.get("virtual") else model


def _memory(entry: dict[str, Any]) -> str:
    """Used of total, and what other processes than its worker hold of it (their memory is no room for tasks)."""
    used, total, others = entry.get("memory_used_mb"), entry.get("memory_total_mb"), entry.get("memory_others_mb")
    if used is None and not total:
        return "-"
    held = f" ({others} others)" if others else ""
    return f"{'-' if used is None else used}/{total or '?'} MiB{held}"


def _utilisation(entry: dict[str, Any]) -> str:
    util = entry.get("utilization_pct")
    return "-" if util is None else f"{util}%"


def _gpu_state(entry: dict[str, Any]) -> str:
    if entry.get("stale"):
        return "stale"
    if entry.get("cordoned"):
        return "cordoned"
    if entry.get("up") is False:
        return "down"
    return "busy" if entry.get("task_id") else "idle"


@control_command
def _usage(args: argparse.Namespace) -> int:
    rows = plane_of(args).usage(args.since, args.by)
    if args.json:
        print_json(rows)
        return EXIT_OK
    body = [
        [r[args.by], f"{r['gpu_seconds']:.1f}", r["runs"], "-" if r["cost"] is None else f"{r['cost']:.4f}"]
        for r in rows
    ]
    print(table([args.by, "gpu seconds", "runs", "cost"], body, f"no GPU time since {args.since}"))
    return EXIT_OK


@control_command
def _parked(args: argparse.Namespace) -> int:
    plane = plane_of(args)
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
