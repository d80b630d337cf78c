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
from gpufleet.errors import BrokerError

if TYPE_CHECKING:
    from gpufleet.cli.tasks import AddCommand
    from gpufleet.config import Fleet
    from gpufleet.delivery.readback import Record


def add_commands(command: AddCommand) -> None:
    p = command("tail", _tail, "follow callback records and dead letters as they arrive (Kafka destinations)")
    p.add_argument("--success", action="store_true", help="success records")
    p.add_argument("--failure", action="store_true", help="failure records")
    p.add_argument("--dead-letters", action="store_true", help="dead letters (default: all three kinds)")
    p.add_argument("--function", metavar="F", help="only records of this function (dead letters: of its triggers)")
    p.add_argument("--from-beginning", action="store_true", help="the records kept so far first, then new ones")
    p.add_argument("--count", type=int, metavar="N", help="stop after N records")
    p.add_argument("--json", action="store_true", help="one JSON document per line (JSON Lines)")
    p = command("redrive", _redrive, "send a trigger's dead letters through intake again, once the cause is fixed; "
                "each keeps its identity, and a letter once redriven is never read again")  # fmt: skip
    p.add_argument("trigger")
    p.add_argument("--reason", help="only dead letters refused for this reason (e.g. unknown_function)")
    p.add_argument("--dry-run", action="store_true", help="list them with their reason and detail, send nothing")
    p.add_argument("--accept-unsigned", action="store_true",
                   help="send letters this fleet did not sign too (written before letters were signed): by default "
                   "they are named and not sent")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as one JSON document")


RECONNECT_S = 0.5
MAX_RECONNECT_S = 5.0


def _load(args: argparse.Namespace) -> Fleet:
    from gpufleet.config import load_fleet
    from gpufleet.logs import configure_logging

    fleet = load_fleet(args.config)
    configure_logging(fleet.settings.logging.model_copy(update={"level": "warning"}), role="cli")
    # kafka-python logs each failed connection attempt; the command says it once, with the fix, and exits 4.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    return fleet


def _tail(args: argparse.Namespace) -> int:
    from gpufleet.delivery.readback import kafka_errors, read, streams

    fleet = _load(args)
    asked = {"success": args.success, "failure": args.failure, "dead_letter": args.dead_letters}
    kinds = tuple(k for k, on in asked.items() if on) or tuple(asked)
    found, other = streams(fleet, kinds)
    for url in other:
        print(f"gpufleet: not followed (only Kafka destinations can be read back): {url}", file=sys.stderr)
    triggers_of = {name for name, t in fleet.triggers.items() if t.function == args.function}
    topics = ", ".join(sorted({s.topic for s in found}))

    lost_at: float | None = None  # while Kafka is out of reach: since when
    following, shown, backoff = False, 0, RECONNECT_S

    def ready() -> None:
        nonlocal following, lost_at, backoff
        if lost_at is None:
            print(f"gpufleet: following {topics}{' from the beginning' if args.from_beginning else ''}",
                  file=sys.stderr, flush=True)  # fmt: skip
        else:
            print(f"gpufleet: Kafka is back after {time.monotonic() - lost_at:.0f} s; following again",
                  file=sys.stderr, flush=True)  # fmt: skip
        following, lost_at, backoff = True, None, RECONNECT_S

    lost: tuple[type[Exception], ...] = (*kafka_errors(), BrokerError)
    positions: dict[tuple[str, int], int] = {}  # where each partition goes on, after a reconnect
    try:
        while True:
            try:
                # After a reconnect, each partition goes on where it was; one not read from yet starts at its end.
                from_beginning = args.from_beginning and not following
                for record in read(fleet, found, threading.Event(), from_beginning=from_beginning, start_at=positions,
                                   on_ready=ready):  # fmt: skip
                    positions[record.topic, record.partition] = record.offset + 1
                    if args.function is not None and not (
                        record.headers.get("function") == args.function or record.headers.get("trigger") in triggers_of
                    ):
                        continue
                    print(_json_line(record) if args.json else _line(record), flush=True)
                    shown += 1
                    if args.count is not None and shown >= args.count:
                        return EXIT_OK
            except lost as exc:
                if not following:
                    raise  # never reached: said once, exit 4 (see report_error)
                if lost_at is None:  # one line an outage, not one a try
                    lost_at = time.monotonic()
                    print(f"gpufleet: lost Kafka ({one_line(exc)[:200]}); reconnecting until it is back "
                          "(Ctrl-C stops)", file=sys.stderr, flush=True)  # fmt: skip
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_RECONNECT_S)
    except KeyboardInterrupt:
        pass  # how one stops following
    return EXIT_OK


def _json_line(record: Record) -> str:
    try:
        value = orjson.loads(record.value)
    except orjson.JSONDecodeError:
        value = record.value.decode(errors="replace")
    return orjson.dumps({"kind": record.kind, "topic": record.topic, "partition": record.partition,
                         "offset": record.offset, "timestamp": record.timestamp, "key": record.key,
                         "headers": record.headers, "value": value}).decode()  # fmt: skip


def _line(record: Record) -> str:
    at = time.strftime("%H:%M:%S", time.localtime(record.timestamp))
    h = record.headers
    if record.kind == "dead_letter":
        what = f"trigger={h.get('trigger', '?')} reason={h.get('reason', '?')} source={h.get('source', '?')}"
        detail = h.get("detail", "")
    else:
        what = f"{record.key} function={h.get('function', '?')} condition={h.get('condition', '?')}"
        detail = outcome_text(record.value)
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
    parts = [f"{took / 1000:.2f}s" if isinstance(took, int | float) else "",
             f"attempts={attempts}" if isinstance(attempts, int) and attempts > 1 else ""]  # fmt: skip
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
            rows = [[r["at"], r["reason"], "yes" if r["signed"] else "no", r["source"], r["detail"][:120]]
                    for r in report.letters]  # fmt: skip
            print(table(["dead letter", "reason", "signed", "source", "detail"], rows, "(none)"))
            print("dry run: nothing sent")
        else:
            print(f"queued {report.queued}, already there {report.duplicates}, refused again {report.dead_lettered}"
                  + (f" ({', '.join(f'{r}: {n}' for r, n in sorted(report.reasons.items()))})" if report.reasons
                     else ""))  # fmt: skip
    return EXIT_FAILED if report.dead_lettered or report.refused else EXIT_OK
