"""Helpers for the browser tests: the system chromium, an HTTP server for an app, page probes."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import WSGIRequestHandler, make_server

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000


def require_browser() -> None:
    """Skip without Debian's chromium or Playwright; under CI=true that is a failure."""
    reason = None
    if not CHROMIUM.exists():
        reason = f"Debian's chromium is not installed ({CHROMIUM}); install it with `apt-get install -y chromium`"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "playwright is not installed: pip install -r requirements-dev.txt"
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the browser tests cannot run: {reason}")
        pytest.skip(reason)


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


@contextmanager
def serve(app: Flask) -> Iterator[str]:
    """Serve `app` with a threaded werkzeug server on a free port; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="ui-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def points(page: Any, chart: str) -> int:
    """Number of steps a chart holds (the page's data-points attribute)."""
    return int(page.get_attribute(f"#{chart}", "data-points") or 0)


def canvas_stats(page: Any, selector: str) -> dict[str, int]:
    """Painted pixels and distinct colours of a canvas."""
    return page.evaluate("""(sel) => {
        const c = document.querySelector(sel);
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let painted = 0; const colours = new Set();
        for (let i = 0; i < d.length; i += 4) {
            if (d[i + 3] > 0) { painted++; colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]); }
        }
        return {painted: painted, colours: colours.size, width: c.width, height: c.height};
    }""", selector)


def screenshot(page: Any, name: str) -> Path:
    """Full-page screenshot into test-artifacts/; checks the file is a PNG."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return path


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `check` until true, or fail after timeout_s (no fixed sleeps as synchronization)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)
