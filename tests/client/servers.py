"""Real HTTP servers for the client tests: the Flask app under werkzeug in a thread, and a small
scriptable stub that answers or forwards (to the real app) request by request.

The stub stands in for what sits between a client and the service in production (a gateway
that answers 503/429, drops connections, times out after forwarding, truncates a body); the
service behind it is the real one, with its real database and broker.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from flask import Flask
from werkzeug.serving import make_server


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_app(app: Flask) -> Iterator[str]:
    """Serve a Flask app with werkzeug's threaded server on a free port; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass
class Reply:
    """Answer locally with this status (a JSON body by default: the service's error envelope)."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        body = self.body
        if body is None:
            body = {"error": {"code": {429: "rate_limited", 503: "unavailable"}.get(self.status, "error"),
                              "message": f"stub answer {self.status}", "details": {}}}
        return json.dumps(body).encode()


# Actions besides Reply(...):
FORWARD = "forward"            # pass to the upstream, return its answer
DROP = "drop"                  # close the connection without answering (nothing forwarded)
FORWARD_DROP = "forward_drop"  # forward, then close without answering (the upstream did the work)
FORWARD_504 = "forward_504"    # forward, then answer 504 (a gateway that timed out waiting)
TRUNCATE = "truncate"          # forward, answer with the full Content-Length but only half the body
CORRUPT = "corrupt"            # forward, flip one byte of the body


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Stub:
    """A threaded HTTP server; `script(method, path_prefix, *actions)` queues actions for matching
    requests, used once each in order; unmatched requests are forwarded (or 404 without upstream)."""

    def __init__(self, upstream: str | None = None) -> None:
        self.upstream = urlsplit(upstream) if upstream else None
        self.seen: list[Seen] = []
        self._rules: list[tuple[str, str, deque[Any]]] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(self.command, self.path, dict(self.headers.items()), body)
                action = stub._next_action(seen)
                if isinstance(action, Reply):
                    self._send(action.status, action.payload(),
                               {"Content-Type": "application/json", **action.headers})
                    return
                if action == DROP:
                    self.close_connection = True
                    return
                status, headers, data = stub._forward(seen)
                if action == FORWARD_DROP:
                    self.close_connection = True
                elif action == FORWARD_504:
                    self._send(504, Reply(504).payload(), {"Content-Type": "application/json"})
                elif action == TRUNCATE:
                    self._send(status, data[: len(data) // 2], headers, length=len(data))
                    self.close_connection = True
                elif action == CORRUPT:
                    flipped = bytes([data[len(data) // 2] ^ 0xFF]) if data else b""
                    self._send(status, data[: len(data) // 2] + flipped + data[len(data) // 2 + 1:], headers)
                else:
                    self._send(status, data, headers)

            def _send(self, status: int, data: bytes, headers: dict[str, str], length: int | None = None) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data) if length is None else length))
                self.end_headers()
                self.wfile.write(data)
                self.wfile.flush()

            do_GET = do_POST = do_DELETE = do_PUT = _handle  # noqa: N815 - stdlib naming

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)

    def __enter__(self) -> Stub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)

    def script(self, method: str, path_prefix: str, *actions: Any) -> Stub:
        with self._lock:
            self._rules.append((method.upper(), path_prefix, deque(actions)))
        return self

    def requests_to(self, method: str, path_prefix: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method.upper() and s.path.startswith(path_prefix)]

    def _next_action(self, seen: Seen) -> Any:
        with self._lock:
            self.seen.append(seen)
            for method, prefix, actions in self._rules:
                if seen.method == method and seen.path.startswith(prefix) and actions:
                    return actions.popleft()
        return FORWARD if self.upstream else Reply(404, {"error": {"code": "not_found", "message": "stub",
                                                                    "details": {}}})

    def _forward(self, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        assert self.upstream is not None, "no upstream to forward to"
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in seen.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(seen.method, seen.path, body=seen.body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            keep = {k: v for k, v in response.getheaders()
                    if k.lower() not in ("connection", "transfer-encoding", "keep-alive", "content-length",
                                         "date", "server")}
            return response.status, keep, data
        finally:
            conn.close()
