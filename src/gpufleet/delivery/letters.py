"""Dead letters: their headers, and the signature that lets ``gpufleet redrive`` trust them.

Every trigger's dead letters may share one topic, and anybody who can write to it could forge one: a record that
names a trigger would become a task of its function, and a forged object event a download by the worker. So each
dead letter carries ``signature: v1=<hex HMAC-SHA256>`` under the fleet's dead-letter key, over its bytes and the
headers redrive acts on (:data:`SIGNED_HEADERS`: the trigger, the reason, the ids and the object flag). Redrive
sends only letters whose signature is right, unless the operator says ``--accept-unsigned``.

The key is the fleet's own, 32 random bytes kept in Redis (``<key_prefix>:dead_letter_key``), made by the first
process that needs it: every role reaches Redis already, and whoever can write to Redis can enqueue tasks anyway,
so it adds no secret to configure. Deleting it starts a new key; letters signed under the old one then count as
unsigned.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

import redis

from gpufleet.registry.keyspace import Keyspace

DEFAULT_ID_HEADER = "default_id"
SUPPLIED_ID_HEADER = "supplied_id"
OBJECT_HEADER = "object_event"  # the value is one ObjectEvent's JSON (a bucket listing), not a notification
SIGNATURE_HEADER = "signature"
SIGNED_HEADERS = ("trigger", "reason", "source", DEFAULT_ID_HEADER, SUPPLIED_ID_HEADER, OBJECT_HEADER, "truncated")
VERSION = "v1="


def fleet_key(client: redis.Redis, prefix: str) -> bytes:
    """The fleet's dead-letter key, made on first use (SET NX: every process gets the same one).

    Raises:
        redis.RedisError: Redis cannot be reached.
    """
    name = Keyspace(prefix).dead_letter_key
    client.set(name, secrets.token_bytes(32), nx=True)
    key = client.get(name)
    assert isinstance(key, bytes)
    return key


def sign(key: bytes, value: bytes, headers: Mapping[str, str]) -> str:
    """The ``signature`` header for a dead letter: each signed header and then the bytes, length-prefixed, so no
    two different letters have the same input."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in (*(headers.get(name, "").encode() for name in SIGNED_HEADERS), value):
        mac.update(len(part).to_bytes(8, "big") + part)
    return VERSION + mac.hexdigest()


def verify(key: bytes, value: bytes, headers: Mapping[str, str]) -> bool:
    """True if the letter's signature is this fleet's, over exactly these bytes and headers."""
    return hmac.compare_digest(headers.get(SIGNATURE_HEADER, "").encode(), sign(key, value, headers).encode())
