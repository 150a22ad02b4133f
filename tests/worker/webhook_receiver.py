"""A Standard Webhooks receiver for tests: an HTTP server thread on 127.0.0.1 that verifies every
signature with the reference library and acts on each webhook-id once (deduplicating retries)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class Receiver:
    """Start with `start()`, take it down with `stop()` and bring it back on the same port with `start()`."""

    def __init__(self, secret: str | None = None) -> None:
        self.verifier = Webhook(secret) if secret else None
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
