"""Task ids, and who may name which: nobody can choose an id that another source will compute.

- **API**: ``api-<hex>``, random, or derived from the function and the ``Idempotency-Key``.
- **Object events**: ``s3-<hex>``, derived from the function and the object's identity (family, bucket, key,
  version or eTag). Every object trigger shares this namespace on purpose: a bucket watched both by notifications
  and by polling runs each object once.
- **Everything else a trigger reads**: ``<trigger>:<id>``, where ``<id>`` is what the producer supplied (header
  or field) or the message's own position (``kafka-<topic>-<partition>-<offset>``). Trigger names cannot contain
  ``:``, and cannot begin with a reserved prefix, so a producer can never reach another trigger's ids, nor the
  ``api-`` and ``s3-`` ones.

The registry keeps each task's origin (:data:`API_ORIGIN`, :data:`OBJECT_ORIGIN` or ``trigger:<name>``). An id
that exists for another function or origin is a conflict, never a duplicate (see ``Registry.enqueue_many``).
"""

from __future__ import annotations

import hashlib
import re
import uuid

API_PREFIX = "api-"
OBJECT_PREFIX = "s3-"
RESERVED_PREFIXES = (API_PREFIX, OBJECT_PREFIX)
API_ORIGIN = "api"
OBJECT_ORIGIN = "objects"
# What a producer may supply; always fullmatch ("$" lets a newline in).
SUPPLIED_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@=+-]{0,199}")


def api_task_id(function: str, idempotency_key: str | None) -> str:
    """The same key for the same function always names the same task; no key, a fresh one."""
    if idempotency_key is None:
        return f"{API_PREFIX}{uuid.uuid4().hex}"
    return API_PREFIX + _digest(function, idempotency_key)[:32]


def object_task_id(function: str, *identity: str) -> str:
    return OBJECT_PREFIX + _digest(function, *identity)[:40]


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def trigger_origin(trigger: str) -> str:
    return f"trigger:{trigger}"


def trigger_task_id(trigger: str, local_id: str) -> str:
    return f"{trigger}:{local_id}"


def trigger_name_error(name: str) -> str | None:
    """Why ``name`` cannot name a trigger, or None."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", name):
        return "use 1 to 100 letters, digits, '.', '_' or '-'"
    if name.lower().startswith(RESERVED_PREFIXES):
        return f"names beginning with {' or '.join(RESERVED_PREFIXES)} are reserved for generated task ids"
    return None
