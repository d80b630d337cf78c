"""Secrets in settings: which ones are strong enough, and how a message names one without showing it.

A setting is secret when its name says so (:func:`is_secret_name`): every error message masks its value, and a
URL's password is masked wherever a URL is shown (:func:`redact_url`). Tokens that guard an HTTP endpoint (the
API's, a webhook's) and HMAC secrets must be strong (:func:`secret_weakness`), unless the API is in dev mode on a
loopback address.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import itertools
import math
import re
from urllib.parse import urlsplit

# RFC 6750's b64token: what a Bearer header can carry unchanged. Anything else could never match.
TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")
MIN_SECRET_CHARS = 32
MIN_SECRET_BITS = 88
# Words that mark a placeholder someone forgot to change (a random token of 32+ characters holds none of them but
# by a chance of about 1 in 10^5).
# fmt: skip below: a list of words reads better packed than one per line.
PLACEHOLDER_WORDS = ("change", "default", "example", "secret", "token", "password", "passw", "gpufleet", "local",
                     "admin", "test", "sample", "dummy", "letmein", "qwerty")  # fmt: skip
SEQUENCE_RUN = 7  # "abcdefg", "1234567", "9876543": typed, not generated
SECRET_NAME_RE = re.compile(r"token|secret|passw|credential|(^|_)key(_id)?$|auth", re.IGNORECASE)
HOW_TO_GENERATE = "generate one with `gpufleet token` (or `openssl rand -hex 32`)"


def shared_secret_fix(var: str) -> str:
    """The fix for a missing or weak secret that another party holds too (a webhook's HMAC secret, a sender's token,
    a broker's password): a freshly made one would not match theirs, so the fix never proposes one alone."""
    return (
        f"export {var}=<the secret the other side holds>; for a new one, make it with `gpufleet token` "
        "and give the same value to both sides"
    )


def is_secret_name(name: str) -> bool:
    """True for a setting or variable whose value must never be shown: ``api.token``, ``hmac_secret``,
    ``s3.secret_access_key``, ``s3.access_key_id``, ``GPUFLEET_API__TOKEN``, ``password``... but not ``token_env``,
    which names the variable that holds one."""
    last = name.rsplit(".", 1)[-1].rsplit("__", 1)[-1]
    return not last.lower().endswith("_env") and bool(SECRET_NAME_RE.search(last))


def hidden(value: object) -> str:
    """How a message shows a secret value: its kind and length, never a character of it."""
    return f"a hidden {type(value).__name__} of {len(str(value))} characters"


def secret_problem(value: str, *, in_header: bool = True, weak_allowed: bool = False) -> str | None:
    """Why ``value`` cannot guard an endpoint (the answer never quotes it), or None. A token sent in an
    Authorization header must be one a header can carry, even where a weak one is allowed (dev mode)."""
    if in_header and not TOKEN_RE.fullmatch(value):
        return "it holds characters an Authorization header cannot carry (use letters, digits and -._~+/)"
    if weak_allowed:
        return None
    if len(value) < MIN_SECRET_CHARS:
        return f"it is {len(value)} characters long; use {MIN_SECRET_CHARS} or more"
    lowered = value.lower()
    if any(word in lowered for word in PLACEHOLDER_WORDS):
        return "it looks like a placeholder (it contains a word such as 'change', 'secret' or 'token')"
    if _has_sequence(value):
        return f"it contains a run of {SEQUENCE_RUN} consecutive characters such as 'abcdefg' or '1234567'"
    if _bits(value) < MIN_SECRET_BITS:
        return f"it repeats too few different characters (under {MIN_SECRET_BITS} bits of entropy)"
    return None


def _bits(value: str) -> float:
    """Shannon entropy of the characters, times the length: repetition ("aaaa", "abab") scores low."""
    n = len(value)
    return -n * sum(c / n * math.log2(c / n) for c in collections.Counter(value).values())


def _has_sequence(value: str) -> bool:
    up = down = 1
    for a, b in itertools.pairwise(value):
        up = up + 1 if ord(b) - ord(a) == 1 else 1
        down = down + 1 if ord(a) - ord(b) == 1 else 1
        if max(up, down) >= SEQUENCE_RUN:
            return True
    return False


def sign(secret: str, body: bytes, timestamp: str | None = None) -> str:
    """gpufleet's ``X-Gpufleet-Signature`` for webhooks in: ``sha256=`` + hex HMAC-SHA256 of ``<timestamp>.<body>``
    when the request carries ``X-Gpufleet-Timestamp``, or of the body alone."""
    signed = body if timestamp is None else timestamp.encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign_delivery(secret: str, task_id: str, body: bytes, timestamp: str) -> str:
    """``X-Gpufleet-Signature`` of a record gpufleet POSTs: HMAC-SHA256 of ``<timestamp>.<task id>.<body>``, so
    ``X-Gpufleet-Task-Id``, the key receivers de-duplicate on, cannot be changed either. (A task id has no ``{``
    and a record is a JSON object: where the id ends and the body begins is never in doubt.)"""
    return sign(secret, task_id.encode() + b"." + body, timestamp)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; false for 0.0.0.0 and every other name."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# A query parameter whose value is a secret: tokens, keys, signatures (``X-Amz-Signature``, ``sig`` of a SAS URL).
SECRET_PARAM_RE = re.compile(
    r"token|secret|passw|pwd|credential|key|signature|(^|[-_])sig$|auth|session", re.IGNORECASE
)
URL_IN_TEXT_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{1,15}://[^\s'\"<>]+")
MASK = "***"


def redact_url(url: str) -> str:
    """A URL as it may be shown: its password and the values of secret-looking query parameters masked.
    ``amqp://app:s3cret@mq/x?token=abc&vhost=v`` -> ``amqp://app:***@mq/x?token=***&vhost=v``."""
    try:
        parts = urlsplit(url)
        shown = url  # edited in place: urlunsplit would drop an empty authority (kafka:///topic)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            shown = shown.replace(parts.netloc, f"{parts.username or ''}:{MASK}@{host}", 1)
        if parts.query:
            pairs = [p.partition("=") for p in parts.query.split("&")]
            query = "&".join(f"{k}={MASK}" if eq and SECRET_PARAM_RE.search(k) else f"{k}{eq}{v}" for k, eq, v in pairs)
            shown = shown.replace(f"?{parts.query}", f"?{query}", 1)
        return shown
    except ValueError:
        return "<a URL that cannot be parsed>"


def redact(text: str) -> str:
    """Free text (an error message, a log line) with every URL in it redacted as :func:`redact_url` does."""
    return URL_IN_TEXT_RE.sub(lambda m: redact_url(m.group(0)), text)
