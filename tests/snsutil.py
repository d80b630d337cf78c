"""A local stand-in for SNS's SubscribeURL, over TLS with a certificate of a test CA made at test time.

The certificate names ``localhost``, ``sns.example.invalid``, ``127.0.0.1`` and ``::1``. A process trusts it with
``SSL_CERT_FILE=<ca_file>`` (OpenSSL reads it for the default context) or with :meth:`TestCA.client_context`.
"""

from __future__ import annotations

import ipaddress
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CERT_NAMES = ("localhost", "sns.example.invalid")
CERT_ADDRESSES = ("127.0.0.1", "::1")
HUGE_BYTES = 256 * 1024 * 1024  # what /huge would send to a client that read it all
CONFIRMED = b"<ConfirmSubscriptionResponse><SubscriptionArn>arn</SubscriptionArn></ConfirmSubscriptionResponse>"


@dataclass(frozen=True)
class TestCA:
    ca_file: Path
    cert_file: Path
    key_file: Path

    __test__ = False  # not a test class, for pytest

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_ca(directory: Path, names: tuple[str, ...] = CERT_NAMES) -> TestCA:
    """A CA, and a server certificate it signs for ``names`` and the loopback addresses, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpufleet test CA")])

    def builder(subject: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=2))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    usage = dict.fromkeys(
        [
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "encipher_only",
            "decipher_only",
        ],
        False,
    )
    ca = (
        builder(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in CERT_ADDRESSES]
    leaf = (
        builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]), key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = TestCA(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    paths.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths.key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


class ConfirmEndpoint:
    """A local stand-in for SNS's SubscribeURL over https on 127.0.0.1: records every GET and the SNI name.

    ``/denied`` answers 403 (as SNS does for an expired or forged token), ``/redirect`` 302 to ``/escaped`` on
    ``localhost``, ``/huge`` 200 with an endless-looking body of ``HUGE_BYTES`` (``huge_complete`` tells, once
    ``huge_done`` is set, whether the client read it all), ``/trickle`` a header a byte at a time for 30 s,
    anything else 200.
    """

    def __init__(self, ca: TestCA) -> None:
        self.paths: list[str] = []
        self.sni: list[str | None] = []
        self.huge_done = threading.Event()
        self.huge_complete: bool | None = None
        self.trickle_done = threading.Event()
        endpoint = self
        context = ca.server_context()

        def record_sni(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext) -> None:
            endpoint.sni.append(name)

        context.sni_callback = record_sni

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                self.request.settimeout(10)
                self.request.do_handshake()  # here, not in the accepting thread: a bad client blocks only itself
                super().setup()

            def do_GET(self) -> None:
                endpoint.paths.append(self.path)
                if self.path.startswith("/huge"):
                    self._huge()
                    return
                if self.path.startswith("/trickle"):
                    self._trickle()
                    return
                if self.path.startswith("/denied"):
                    self.send_response(403)
                elif self.path.startswith("/redirect"):  # elsewhere: a host the trigger may not allow
                    self.send_response(302)
                    self.send_header("Location", f"https://localhost:{endpoint.port}/escaped")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(CONFIRMED)))
                self.end_headers()
                self.wfile.write(CONFIRMED)

            def _huge(self) -> None:
                sent, chunk = 0, b"<x>" + b"y" * (64 * 1024 - 7) + b"</x>"
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/xml")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    while sent < HUGE_BYTES:
                        self.wfile.write(chunk)
                        sent += len(chunk)
                    self.wfile.flush()
                except OSError:  # the client hung up: what we want
                    pass
                finally:
                    endpoint.huge_complete = sent >= HUGE_BYTES
                    endpoint.huge_done.set()
                    self.close_connection = True

            def _trickle(self) -> None:
                try:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    for _ in range(300):  # 30 s of header, a byte every 0.1 s: no receive ever times out
                        self.wfile.write(b"z")
                        self.wfile.flush()
                        time.sleep(0.1)
                except OSError:
                    pass
                finally:
                    endpoint.trickle_done.set()
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[Any, Any]:
                sock, addr = self.socket.accept()
                return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that refused the certificate or hung up

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port: int = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ConfirmEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
