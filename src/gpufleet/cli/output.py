"""What the CLI prints: JSON documents for scripts, aligned tables and error lines for people.

Stdlib and orjson only: importing it must stay cheap for commands that never print a table.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from gpufleet.errors import BrokerError, ConflictError, GpufleetError, NotFoundError, PortInUseError, RequestError

EXIT_OK = 0
EXIT_FAILED = 1  # not found, conflict, or the task finished without succeeding
EXIT_USAGE = 2  # bad input or configuration (argparse uses 2 as well)
EXIT_TIMEOUT = 3  # --timeout passed before the task finished
EXIT_UNREACHABLE = 4  # Redis or Kafka cannot be reached
EXIT_PORT_IN_USE = 5  # a port this process must listen on is taken
EXIT_INTERRUPTED = 130  # Ctrl-C while following a task

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]+")


def dumps(document: Any) -> str:
    return orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


def print_json(document: Any) -> None:
    print(dumps(document))


def one_line(text: object) -> str:
    """Text safe to put on one terminal line: control characters (newlines, ``\\r``, escapes) become spaces."""
    return _CONTROL_CHARS.sub(" ", str(text)).strip()


def error_code(exc: GpufleetError) -> str:
    """The stable code a script sees: a RequestError's own, else the class name in snake case."""
    if isinstance(exc, RequestError):
        return exc.code
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


def exit_code(exc: GpufleetError) -> int:
    """1 when the thing asked about is missing or in the wrong state; 2 when the input or configuration is bad; 4
    when Redis or Kafka cannot be reached."""
    if isinstance(exc, BrokerError):
        return EXIT_UNREACHABLE
    if isinstance(exc, PortInUseError):
        return EXIT_PORT_IN_USE
    return EXIT_FAILED if isinstance(exc, NotFoundError | ConflictError) else EXIT_USAGE


def report_error(exc: GpufleetError, as_json: bool) -> int:
    """``gpufleet: error: ...`` on stderr always; with ``--json`` also ``{"error": {"code", "message"}}`` on
    stdout, so a script reading stdout gets one document either way. Returns the exit code."""
    message = exc.message if isinstance(exc, RequestError) else str(exc)
    print(f"gpufleet: error: {message}", file=sys.stderr)
    if as_json:
        print_json({"error": {"code": error_code(exc), "message": message}})
    return exit_code(exc)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], empty: str = "(none)") -> str:
    """Left-aligned columns, two spaces apart; ``None`` cells print as ``-``."""
    if not rows:
        return empty
    cells = [[one_line("-" if c is None or c == "" else c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def seconds(value: object) -> str:
    """``900.0`` -> ``900s``, ``0.5`` -> ``0.5s``; None -> ``-``."""
    if value is None:
        return "-"
    return f"{float(value):g}s" if isinstance(value, int | float) else str(value)
