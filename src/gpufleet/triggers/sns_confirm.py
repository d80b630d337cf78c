"""Confirming an SNS HTTP(S) subscription: a guarded GET of the ``SubscribeURL`` of a ``SubscriptionConfirmation``.

The URL comes from an unauthenticated part of the request body (the trigger's token proves the sender may post,
not that SNS wrote the URL), so the fetch is the one place where a webhook makes the api role call out. It must
not become a way to reach the fleet's own network (SSRF). Guarantees:

- **https only**, no credentials in the URL, nothing but printable ASCII, at most ``MAX_URL_CHARS``.
- **Host patterns**, compared case-insensitively with the whole host name: an entry is an exact host name
  (``sns.us-east-1.amazonaws.com``) or has ``*`` for exactly one DNS label (``sns.*.amazonaws.com``). An entry
  may also be an exact IP address, which only ``allow_private`` lets through.
- **Public addresses only**: IP literals are refused, and so is a host with any resolved address that is not
  global (private, loopback, link-local, shared, reserved, multicast, unspecified, or an IPv6 form of one).
  ``allow_private`` (LocalStack, a test fleet) lifts these two checks only.
- **No second lookup**: the connection goes to an address that was checked (defeats DNS rebinding), while TLS
  still sends SNI and verifies the certificate against the host name of the URL.
- **No redirects** (a 3xx is a failure), a 2xx status is required, at most ``MAX_BODY_BYTES`` of the body are
  read, and the exchange has a deadline of ``timeout_s``, when the connection is cut whatever is waiting (a peer
  that sends a byte now and then would keep a socket timeout from ever firing). The DNS lookup is the system
  resolver's, with its own timeout.
- **One error**: every failure raises :class:`SnsConfirmError`, whose ``cause`` is for the server log (with any
  ``Token`` query parameter redacted) and never for the sender.
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import urlsplit

from gpufleet.errors import GpufleetError

MAX_URL_CHARS = 4096
MAX_BODY_BYTES = 64 * 1024
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TOKEN = re.compile(r"(?i)(token=)[^&#\s'\"]*")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_SockAddr = tuple[int, tuple[Any, ...]]  # a family, and an address for socket.connect


class SnsConfirmError(GpufleetError):
    """The subscription could not be confirmed. ``cause`` says why, for the server log only."""

    def __init__(self, cause: str):
        self.cause = redact(cause)
        super().__init__(self.cause)


def redact(text: str) -> str:
    """``text`` (a URL, an error message) with the values of ``Token=`` parameters hidden, cut to 500 characters."""
    return _TOKEN.sub(r"\1<redacted>", text)[:500]


SNS_HOSTS = ("sns.*.amazonaws.com", "sns.*.amazonaws.com.cn")  # the default patterns: "*" is exactly one DNS label


def check_host_pattern(entry: str) -> str:
    """The entry of ``sns_confirm_hosts``, lower-cased, or ValueError saying how to write it."""
    pattern = entry.strip().lower()
    if _ip_literal(pattern) is not None:
        return pattern
    labels = pattern.split(".")
    if all(label == "*" or _LABEL.fullmatch(label) for label in labels) and labels[-1] != "*":
        return pattern
    raise ValueError(
        f"{entry!r} is not a host pattern: write an exact host name (sns.us-east-1.amazonaws.com) or put * for "
        "exactly one DNS label (sns.*.amazonaws.com), but not as the last label; regular expressions are not accepted"
    )


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    """Whether ``host`` is one of ``patterns`` (see :func:`check_host_pattern`), compared whole and case-blind."""
    host = host.lower()
    address = _ip_literal(host)
    labels = host.split(".")
    for pattern in patterns:
        pattern = pattern.lower()
        wanted = _ip_literal(pattern)
        if address is not None or wanted is not None:
            if address is not None and address == wanted:
                return True
            continue
        expected = pattern.split(".")
        if len(expected) == len(labels) and all(
            got == want if want != "*" else bool(_LABEL.fullmatch(got))
            for got, want in zip(labels, expected, strict=True)
        ):
            return True
    return False


def address_allowed(address: IPAddress) -> bool:
    """Whether an address is public: global, and neither private, loopback, link-local, reserved, multicast nor
    unspecified. An IPv4-mapped or NAT64 IPv6 address is judged by its IPv4 address; a 6to4 or Teredo one must
    pass with the IPv4 addresses it carries too."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address_allowed(address.ipv4_mapped)
        if address in _NAT64:  # DNS64 on an IPv6-only network: the gateway connects to the IPv4 address
            return address_allowed(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if (
        not address.is_global
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
    ):
        return False
    if isinstance(address, ipaddress.IPv6Address):
        return all(address_allowed(e) for e in (address.sixtofour, *(address.teredo or ())) if e is not None)
    return True


def confirm_subscription(
    url: str,
    patterns: Iterable[str],
    *,
    allow_private: bool,
    timeout_s: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """GET ``url`` under the guarantees of this module; returns once it answered 2xx.

    Args:
        url: the ``SubscribeURL`` of the confirmation.
        patterns: host patterns, as ``sns_confirm_hosts``.
        allow_private: allow IP literals and non-public addresses (``sns_confirm_private``).
        timeout_s: the deadline of the exchange, DNS lookup aside (see above).
        ssl_context: the TLS context; the default verifies against the system's CAs (``SSL_CERT_FILE`` works).

    Raises:
        SnsConfirmError: whatever went wrong, with the cause.
    """
    deadline = time.monotonic() + timeout_s
    try:
        _confirm(url, tuple(patterns), allow_private, deadline, ssl_context)
    except SnsConfirmError:
        raise
    except Exception as exc:  # any failure is the one answer; the cause goes to the log
        late = "timed out: " if time.monotonic() >= deadline else ""
        raise SnsConfirmError(f"{late}{type(exc).__name__}: {exc}") from exc


def _confirm(
    url: str, patterns: tuple[str, ...], allow_private: bool, deadline: float, ssl_context: ssl.SSLContext | None
) -> None:
    if len(url) > MAX_URL_CHARS:
        raise SnsConfirmError(f"the URL has {len(url)} characters, over {MAX_URL_CHARS}")
    if not all("!" <= c <= "~" for c in url):
        raise SnsConfirmError("the URL has a space, a control or a non-ASCII character")
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise SnsConfirmError(f"the URL's scheme is {parts.scheme!r}, not 'https'")
    if "@" in parts.netloc:
        raise SnsConfirmError("the URL carries credentials")
    host = parts.hostname or ""
    port = 443 if parts.port is None else parts.port  # .port raises ValueError when out of range
    if port == 0:
        raise SnsConfirmError("the URL's port is 0")
    if not host_allowed(host, patterns):
        raise SnsConfirmError(f"host {host!r} is not allowed by sns_confirm_hosts")
    if _ip_literal(host) is not None and not allow_private:
        raise SnsConfirmError(f"host {host!r} is an IP address (allowed only with sns_confirm_private)")
    addresses = _resolve(host, port, allow_private)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    sock = _connect(addresses, deadline)
    with _cut_at(sock, deadline):
        try:
            sock.settimeout(_remaining(deadline))
            context = ssl_context or ssl.create_default_context()
            tls = context.wrap_socket(sock, server_hostname=host)  # SNI, and the certificate must name the host
        except BaseException:
            sock.close()
            raise
        _get(tls, host, port, path, deadline)


def _get(tls: ssl.SSLSocket, host: str, port: int, path: str, deadline: float) -> None:
    """GET ``path`` over ``tls``; returns once a 2xx was answered and up to ``MAX_BODY_BYTES`` of it read."""
    conn = _PinnedHTTPSConnection(host, port, tls)
    resp = None
    try:
        conn.request(
            "GET", path, headers={"User-Agent": "gpufleet", "Accept-Encoding": "identity", "Connection": "close"}
        )
        tls.settimeout(_remaining(deadline))
        resp = conn.getresponse()
        if not 200 <= resp.status < 300:
            raise SnsConfirmError(f"{host} answered HTTP {resp.status} (redirects are not followed)")
        left = MAX_BODY_BYTES
        while left > 0:  # read what SNS answers, a few hundred bytes, and stop at the cap: the 2xx is what counts
            _remaining(deadline)
            chunk = resp.read1(min(left, 16 * 1024))
            if not chunk:
                break
            left -= len(chunk)
    finally:
        if resp is not None:
            resp.close()  # with "Connection: close" the response, not the connection, holds the socket
        conn.close()
        tls.close()


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolve(host: str, port: int, allow_private: bool) -> list[_SockAddr]:
    """Every address of ``host``; refused whole if any one is not public (unless ``allow_private``)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise SnsConfirmError(f"cannot resolve {host!r}: {exc}") from exc
    found = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        if not allow_private and not address_allowed(address):
            raise SnsConfirmError(f"{host!r} resolves to {address}, which is not a public address")
        found.append((int(family), sockaddr))
    if not found:
        raise SnsConfirmError(f"{host!r} has no IPv4 or IPv6 address")
    return found


def _connect(addresses: list[_SockAddr], deadline: float) -> socket.socket:
    """A TCP connection to the first of the checked addresses that answers (never a new lookup)."""
    errors = []
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            errors.append(f"{sockaddr[0]}: {exc}")
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise SnsConfirmError(f"cannot connect: {'; '.join(errors)}")


@contextmanager
def _cut_at(sock: socket.socket, deadline: float) -> Iterator[None]:
    """Shuts the connection down at the deadline, whatever receive is waiting then. The timer holds a duplicate
    of the descriptor, so it can never cut another connection that reused the number."""
    dup = sock.dup()
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _shutdown, args=(dup,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        dup.close()


def _shutdown(sock: socket.socket) -> None:
    with suppress(OSError):  # the peer closed it already
        sock.shutdown(socket.SHUT_RDWR)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise SnsConfirmError("timed out")
    return left


class _PinnedHTTPSConnection(http.client.HTTPConnection):
    """HTTP over a TLS socket already connected to a checked address: it never resolves or connects by itself."""

    default_port = 443  # the Host header names the port only when it is not 443

    def __init__(self, host: str, port: int, sock: ssl.SSLSocket) -> None:
        super().__init__(host, port)
        self.sock = sock

    def connect(self) -> None:
        raise ConnectionError("the pinned connection is closed")  # no reconnect, by name or otherwise
