"""What an event may hold: the JSON every intake path (triggers, the HTTP API, the CLI) accepts.

An event must survive being stored, run and quoted back in a callback record, so intake refuses, with a stable
reason, what would break later:

- more than :data:`MAX_DEPTH` levels of nesting (``nesting_too_deep``): orjson refuses to write more than 255,
  and the task envelope adds levels of its own;
- an integer outside the signed/unsigned 64-bit range, or a float that is NaN or infinite (``bad_number``):
  orjson would silently turn the first into a float, and JSON has no spelling for the second;
- bytes that are not JSON (``malformed_json``).
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

from gpufleet.errors import EventError

MAX_DEPTH = 64  # levels of arrays and objects, the outermost included
INT_MIN, INT_MAX = -(2**63), 2**64 - 1  # what orjson writes as an integer
# An integer literal of 19+ digits may be outside 64 bits, which orjson would have read as a float. Only then is the
# slower exact check run. The test: every digit made "0" and everything else "x" (one C pass, 8x cheaper than a regex
# search), then a run of 19 zeros; digits inside strings count too, and the exact check ignores them.
_DIGITS_ONLY = bytes(48 if 48 <= c <= 57 else 120 for c in range(256))
_LONG_RUN = b"0" * 19


def decode_event(raw: bytes | str) -> Any:
    """Parse JSON bytes into an event, or raise :class:`EventError` with the reason."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:  # also invalid UTF-8, NaN, Infinity and 1e400
        # orjson stops at 1,024 levels itself: that is a nesting too deep, not malformed JSON.
        reason = "nesting_too_deep" if str(exc).startswith("depth limit exceeded") else "malformed_json"
        raise EventError(reason, str(exc)) from None
    data = raw.encode() if isinstance(raw, str) else raw
    # orjson reads no NaN or infinity, and reads a too-long integer as a float (see _LONG_RUN), so only the depth
    # is left to check: fewer brackets than MAX_DEPTH (those in strings count too) cannot nest deeper.
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH:
        check_event(value)
    if _LONG_RUN in data.translate(_DIGITS_ONLY):
        try:
            json.loads(data, parse_int=_exact_int)  # raises EventError for an integer beyond 64 bits
        except (ValueError, RecursionError) as exc:  # orjson accepted it, so this is only a safety net
            raise EventError("malformed_json", str(exc)) from None
    return value


def check_event(value: Any) -> None:
    """Raise :class:`EventError` if an already decoded value nests too deep or holds a number JSON cannot carry."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise EventError("bad_number", f"{item!r} is not a finite number; JSON cannot carry it")
            continue
        elif isinstance(item, int) and not isinstance(item, bool):
            if not INT_MIN <= item <= INT_MAX:
                raise EventError("bad_number", f"an integer of {len(str(abs(item)))}+ digits is outside 64 bits")
            continue
        else:
            continue
        if depth > MAX_DEPTH:
            raise EventError("nesting_too_deep", f"more than {MAX_DEPTH} levels of nested arrays and objects")
        stack.extend((child, depth + 1) for child in children)


def _exact_int(text: str) -> int:
    if len(text.lstrip("-")) > 20:  # int() itself refuses more than 4,300 digits
        raise EventError("bad_number", f"an integer of {len(text)} digits is outside 64 bits")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise EventError("bad_number", f"integer {text} is outside 64 bits")
    return value
