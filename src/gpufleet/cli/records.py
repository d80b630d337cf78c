"""Commands that read records back from the destinations: ``tail`` (follow them live) and ``redrive`` (re-send a
trigger's dead letters through intake). See :mod:`gpufleet.delivery.readback`."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING

import orjson

from gpufleet.cli.output import EXIT_FAILED, EXIT_OK, one_line, print_json, table

if TYPE_CHECKING:
    from gpufleet.cli.tasks import AddCommand
    from gpufleet.config import Fleet
    from gpufleet.delivery.readback import Note, Record, Source


def add_commands(command: AddCommand) -> None:
    p = command("tail", _tail, "follow callback records and dead letters as they land (Kafka, S3, SQS, RabbitMQ)")
    p.add_argument("--success", action="store_true", help="success records")
    p.add_argument("--failure", action="store_true", help="failure records")
    p.add_argument("--dead-letters", action="store_true", help="dead letters (default: all three kinds)")
    p.add_argument("--function", metavar="F", help="only records of this function (dead letters: of its triggers)")
    p.add_argument("--from-beginning", action="store_true", help="the records kept so far first, then new ones")
    p.add_argument("--count", type=int, metavar="N", help="stop after N records")
    p.add_argument("--json", action="store_true", help="one JSON document per line (JSON Lines)")
    p = command(
        "redrive",
        _redrive,
        "send a trigger's dead letters through intake again, once the cause is fixed; "
        "each keeps its identity, and a letter once redriven is never read again",
    )
    p.add_argument("trigger")
    p.add_argument("--reason", help="only dead letters refused for this reason (e.g. unknown_function)")
    p.add_argument("--dry-run", action="store_true", help="list them with their reason and detail, send nothing")
    p.add_argument(
        "--accept-unsigned",
        action="store_true",
        help="send letters this fleet did not sign too (written before letters were signed): by default "
        "they are named and not sent",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON document")


def _load(args: argparse.Namespace) -> Fleet:
    from gpufleet.config import load_fleet
    from gpufleet.logs import configure_logging

    fleet = load_fleet(args.config)
    configure_logging(fleet.settings.logging.model_copy(update={"level": "warning"}), role="cli")
    # kafka-python logs each failed connection attempt; the command says it once, with the fix, and exits 4.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    return fleet


def _tail(args: argparse.Namespace) -> int:
    from gpufleet.delivery.readback import Note, follow, sources

    fleet = _load(args)
    asked = {"success": args.success, "failure": args.failure, "dead_letter": args.dead_letters}
    kinds = tuple(k for k, on in asked.items() if on) or tuple(asked)
    found, other = sources(fleet, kinds)
    for url in other:
        print(f"gpufleet: not followed (its records cannot be read back where they land): {url}", file=sys.stderr)
    if not found:
        return EXIT_OK
    triggers_of = {name for name, t in fleet.triggers.items() if t.function == args.function}
    waiting = {id(s): s for s in found}  # "following" is said once every source is followed or skipped
    followed: list[Source] = []
    shown = 0
    try:
        for item in follow(found, threading.Event(), args.from_beginning):
            if isinstance(item, Note):
                _say(item, waiting, followed, args.from_beginning)
                continue
            h = item.landed.headers
            if args.function is not None and not (
                h.get("function") == args.function or h.get("trigger") in triggers_of
            ):
                continue
            print(_json_line(item) if args.json else _line(item), flush=True)
            shown += 1
            if args.count is not None and shown >= args.count:
                break
    except KeyboardInterrupt:
        pass  # how one stops following
    return EXIT_OK


def _say(note: Note, waiting: dict[int, Source], followed: list[Source], from_beginning: bool) -> None:
    """The one line each change of a source's state is worth, on stderr; "following" once every source is followed
    or skipped."""
    system = note.source.reader.system
    if note.what in ("ready", "skipped") and waiting.pop(id(note.source), None) is not None:
        if note.what == "ready":
            followed.append(note.source)
        else:
            print(f"gpufleet: not followed: {one_line(str(note.error))}", file=sys.stderr, flush=True)
        if not waiting and followed:
            where = ", ".join(sorted({s.reader.where for s in followed}))
            new_only = sorted({s.reader.system for s in followed if not s.reader.history})
            since = " from the beginning" if from_beginning else ""
            if from_beginning and new_only:
                since += f" ({', '.join(new_only)}: new records only)"
            print(f"gpufleet: following {where}{since}", file=sys.stderr, flush=True)
    elif note.what == "lost":
        print(
            f"gpufleet: lost {system} ({one_line(str(note.error))[:200]}); reconnecting until it is back "
            "(Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )
    elif note.what == "back":
        print(f"gpufleet: {system} is back after {note.after_s:.0f} s; following again", file=sys.stderr, flush=True)


def _json_line(record: Record) -> str:
    landed = record.landed
    try:
        value = orjson.loads(landed.value)
    except orjson.JSONDecodeError:
        value = landed.value.decode(errors="replace")
    return orjson.dumps(
        {
            "kind": record.kind,
            "where": landed.where,
            "position": landed.position,
            "timestamp": landed.timestamp,
            "key": landed.key,
            "headers": landed.headers,
            "value": value,
        }
    ).decode()


def _line(record: Record) -> str:
    landed = record.landed
    at = time.strftime("%H:%M:%S", time.localtime(landed.timestamp))
    h = landed.headers
    if record.kind == "dead_letter":
        what = f"trigger={h.get('trigger', '?')} reason={h.get('reason', '?')} source={h.get('source', '?')}"
        detail = h.get("detail", "")
    else:
        what = f"{landed.key} function={h.get('function', '?')} condition={h.get('condition', '?')}"
        detail = outcome_text(landed.value)
    return one_line(f"{at}  {record.kind:<11}  {what}  {detail[:200]}")


def outcome_text(value: bytes) -> str:
    """What a person follows a record for: how long it ran and the result (``-> {...}``), or the error; the rest of
    the record is in ``--json``."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return value.decode(errors="replace")
    if not isinstance(doc, dict):
        return orjson.dumps(doc).decode()
    context, payload = doc.get("responseContext") or {}, doc.get("responsePayload")
    attempts = (doc.get("requestContext") or {}).get("approximateInvokeCount")
    took = context.get("durationMs") if isinstance(context, dict) else None
    parts = [
        f"{took / 1000:.2f}s" if isinstance(took, int | float) else "",
        f"attempts={attempts}" if isinstance(attempts, int) and attempts > 1 else "",
    ]
    failed = (doc.get("requestContext") or {}).get("condition") not in (None, "Success")
    if failed and isinstance(payload, dict) and ("errorType" in payload or "errorMessage" in payload):
        parts.append(f"{payload.get('errorType', 'Error')}: {payload.get('errorMessage', '')}")
    else:
        parts.append("-> " + orjson.dumps(payload).decode())
    return "  ".join(p for p in parts if p)


def _redrive(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from gpufleet.control.redrive import redrive

    report = redrive(_load(args), args.trigger, args.reason, args.dry_run, args.accept_unsigned)
    if args.json:
        print_json(asdict(report))
    else:
        which = f" ({args.reason})" if args.reason else ""
        print(f"{report.read} dead letters of trigger {report.trigger}{which} not redriven before")
        if report.refused:
            print(f"{len(report.refused)} not sent: this fleet did not sign them (--accept-unsigned sends them too)")
            for r in report.refused:
                print(f"  {r['at']}  {r['why']}  reason={r['reason']}  source={r['source']}")
        if args.dry_run:
            rows = [
                [r["at"], r["reason"], "yes" if r["signed"] else "no", r["source"], r["detail"][:120]]
                for r in report.letters
            ]
            print(table(["dead letter", "reason", "signed", "source", "detail"], rows, "(none)"))
            print("dry run: nothing sent")
        else:
            print(
                f"queued {report.queued}, already there {report.duplicates}, refused again {report.dead_lettered}"
                + (f" ({', '.join(f'{r}: {n}' for r, n in sorted(report.reasons.items()))})" if report.reasons else "")
            )
    return EXIT_FAILED if report.dead_lettered or report.refused else EXIT_OK
