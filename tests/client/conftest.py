"""Fixtures for the client tests: the real service over real HTTP.

- `api_url` / `api_key`: the app of tests/conftest.py (temp database and broker, no worker) served
  by werkzeug in a thread, and a key made with `flask keys create`.
- `live`: the integration Stack of tests/integration/conftest.py (database, embedded broker, a real
  `celery worker` process) with its app served over HTTP; session-scoped, embedded defaults only.
- `cli(url, key, *args)`: run the `stabletrain` command in-process, capturing its output.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskCliRunner

from stabletrain import Client
from stabletrain.cli import main
from tests.client.servers import serve_app
from tests.conftest import create_key
from tests.integration.conftest import Stack

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "data" / "corpus.txt"


@dataclass
class CliResult:
    rc: int
    out: str
    err: str


def run_cli(*args: str) -> CliResult:
    """`stabletrain ARGS` in this process; stdout and stderr (progress bar, errors) captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as exc:  # argparse usage errors
            rc = exc.code if isinstance(exc.code, int) else 2
    return CliResult(rc, out.getvalue(), err.getvalue())


@pytest.fixture
def api_url(app: Flask) -> Iterator[str]:
    """The service (no worker) over HTTP on a free port."""
    with serve_app(app) as url:
        yield url


@pytest.fixture
def api_key(runner: FlaskCliRunner) -> str:
    return create_key(runner, "client")[1]


@pytest.fixture
def make_client() -> Iterator[Callable[..., Client]]:
    """Factory of clients with fast backoff whose sleeps are recorded (client.slept); closed after."""
    made: list[Client] = []

    def make(url: str, key: str | None, **kwargs: Any) -> Client:
        kwargs.setdefault("backoff", 0.01)
        kwargs.setdefault("max_backoff", 0.05)
        client = Client(url=url, key=key, **kwargs)
        client.slept = []  # type: ignore[attr-defined]

        def sleep(seconds: float) -> None:
            client.slept.append(seconds)  # type: ignore[attr-defined]

        client._sleep = sleep
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@dataclass
class Live:
    stack: Stack
    url: str
    key: str

    def cli(self, *args: str) -> CliResult:
        return run_cli("--url", self.url, "--key", self.key, *args)

    def client(self, **kwargs: Any) -> Client:
        return Client(**{"url": self.url, "key": self.key, **kwargs})


@pytest.fixture(scope="session")
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """SQLite database + embedded broker + one real worker process + the API over HTTP."""
    root = tmp_path_factory.mktemp("client-stack")
    stack = Stack("client", f"sqlite:///{root / 'stabletrain.db'}",
                  f"sqlalchemy+sqlite:///{root / 'broker.db'}", root)
    try:
        stack.migrate()
        stack.start_worker()
        key = stack.auth["Authorization"].split(" ", 1)[1]
        with serve_app(stack.app) as url:
            yield Live(stack, url, key)
    finally:
        failed = request.session.testsfailed
        stack.close()
        if failed:
            print(f"\n--- worker log (client stack) ---\n{stack.log_tail()}")
