"""A Standard Webhooks receiver for tests: an HTTP server thread on 127.0.0.1 that verifies every
signature with the reference library and acts on each webhook-id once (deduplicating retries)."""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class Receiver:
    """Start with `start()`, take it down with `stop()` and bring it back on the same port with `start()`."""

    def __init__(self, secret: str | None = None, tls: tuple[str, str] | None = None) -> None:
        self.verifier = Webhook(secret) if secret else None
        self.tls = tls  # (certificate, key) PEM files: serve https
        self.port = 0
        self.answer = 204  # what /hook answers; a 3xx carries Location: /elsewhere
        self.requests: list[dict[str, Any]] = []  # every request that arrived, in order
        self.acted: dict[str, dict[str, Any]] = {}  # webhook-id -> payload, first arrival only
        self.bad_signatures = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def use_secret(self, secret: str) -> None:
        """Verify with this secret from now on (an endpoint's secret is known once it is created)."""
        self.verifier = Webhook(secret)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.handle(self, body)

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Down: the port refuses connections until `start()` again."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def handle(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._lock:
            self.requests.append({"path": request.path, "headers": headers, "body": body})
            status = self.answer if request.path == "/hook" else 200
            if status == 204 and request.path == "/hook":
                try:
                    if self.verifier is None:
                        raise WebhookVerificationError("no secret to verify with")
                    payload = self.verifier.verify(body, headers)
                except WebhookVerificationError:
                    self.bad_signatures += 1
                    status = 400
                else:
                    self.acted.setdefault(headers["webhook-id"], payload)  # a retry of a handled id: no-op
        request.send_response(status)
        if 300 <= status < 400:
            request.send_header("Location", "/elsewhere")
        request.send_header("Content-Length", "0")
        request.end_headers()

    def paths(self) -> list[str]:
        with self._lock:
            return [r["path"] for r in self.requests]

    def payloads(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(r["body"]) for r in self.requests]


def self_signed(folder: Path, name: str) -> tuple[str, str, str]:
    """A certificate for DNS name `name` signed by a fresh test CA: (CA file, certificate file, key file)."""
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
          .not_valid_after(now + timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = (folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    files[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(files[0]), str(files[1]), str(files[2])
