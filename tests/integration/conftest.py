"""A real stack per session: database + broker + a `celery worker` subprocess + the API's test client.

Two variants: `embedded` (SQLite file + SQLAlchemy/SQLite broker, no servers) and
`servers` (a fresh PostgreSQL database + a dedicated Redis db number, from
STABLETRAIN_TEST_POSTGRES_URL / STABLETRAIN_TEST_REDIS_URL; skipped without them,
failed under CI=true).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from app.extensions import db
from tests.conftest import create_database, create_key, drop_database, postgres_base_url
from worker.testing import server_url_or_skip, wait_for

REPO = Path(__file__).resolve().parents[2]
# Integration runs use their own Redis database so they never consume another suite's messages.
REDIS_DB = int(os.environ.get("STABLETRAIN_TEST_REDIS_DB", "12"))

# Short leases and periods: a killed worker's job is requeued in seconds, not minutes.
WORKER_ENV = {
    "STABLETRAIN_LEASE_S": "4",
    "STABLETRAIN_HEARTBEAT_S": "0.5",
    "STABLETRAIN_RECONCILE_EVERY_S": "1",
    "STABLETRAIN_RESEND_AFTER_S": "30",
    "STABLETRAIN_DEVICE": "cpu",
    "STABLETRAIN_LOG_LEVEL": "INFO",
    "OMP_NUM_THREADS": "1",  # two shared cores: the worker must not starve the test process
}


def start_worker_process(env: dict[str, str], log_path: Path, name: str = "it",
                         pool: tuple[str, ...] = ("-Q", "train,samples", "-c", "1", "--pool=solo")
                         ) -> subprocess.Popen[bytes]:
    """Start one `celery worker` (by default: solo pool, train and samples) appending to log_path; return
    once it is ready."""
    proc, wait_ready = launch_worker_process(env, log_path, name, pool)
    wait_ready()
    return proc


def launch_worker_process(env: dict[str, str], log_path: Path, name: str = "it",
                          pool: tuple[str, ...] = ("-Q", "train,samples", "-c", "1", "--pool=solo"),
                          ) -> tuple[subprocess.Popen[bytes], Callable[[], None]]:
    """Start one `celery worker` without waiting; the returned callable waits until it is ready."""
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it until it exits
    start = log_path.stat().st_size
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", *pool,
           "-n", f"{name}-{uuid.uuid4().hex[:8]}@%h", "--loglevel=INFO"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()

    def since_start() -> str:
        with open(log_path, "rb") as fh:
            fh.seek(start)
            return fh.read().decode("utf-8", "replace")

    def wait_ready() -> None:
        wait_for(lambda: " ready." in since_start() or proc.poll() is not None, 120, "the worker to be ready")
        assert proc.poll() is None, since_start()[-6000:]

    return proc, wait_ready

class Stack:
    """Database, broker, storage, one worker process and an API client, all sharing one config."""

    def __init__(self, name: str, database_url: str, broker_url: str, root: Path,
                 extra_config: dict[str, str] | None = None) -> None:
        self.name, self.root = name, root
        self.config = {
            "DATABASE_URL": database_url,
            "BROKER_URL": broker_url,
            "STORAGE_DIR": str(root / "storage"),
            **(extra_config or {}),
        }
        self.env = {**os.environ, **WORKER_ENV, **{f"STABLETRAIN_{k}": v for k, v in self.config.items()}}
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_log = root / "worker.log"
        self.app: Flask = create_app({**self.config, "TESTING": True, "RATELIMIT_ENABLED": False})
        self.client: FlaskClient = self.app.test_client()
        self.auth: dict[str, str] = {}

    def migrate(self) -> None:
        """Create the schema the way scripts/serve.sh and the compose `migrate` service do."""
        out = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "db", "upgrade"], cwd=REPO,
                             env=self.env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        _, secret = create_key(self.app.test_cli_runner(), f"integration-{self.name}")
        self.auth = {"Authorization": f"Bearer {secret}"}

    def start_worker(self) -> None:
        """Start `celery worker` on both queues and wait until it says it is ready."""
        self.worker = start_worker_process(self.env, self.worker_log)

    def stop_worker(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> None:
        """Stop our worker by pid (SIGTERM = warm shutdown; SIGKILL = crash)."""
        if self.worker is None:
            return
        if self.worker.poll() is None:
            self.worker.send_signal(sig)
            try:
                self.worker.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait(timeout=30)
        self.worker = None

    def _log_since(self, offset: int) -> str:
        with open(self.worker_log, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")

    def log_tail(self, chars: int = 6000) -> str:
        text = self._log_since(0)
        return text[-chars:]

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the API with this stack's key; returns the test response."""
        return self.client.open(path, method=method, headers=self.auth, **kwargs)

    def close(self) -> None:
        self.stop_worker()
        with self.app.app_context():
            db.engine.dispose()


def _redis_url(base: str) -> str:
    scheme_host = base.rsplit("/", 1)[0] if base.count("/") > 2 else base
    return f"{scheme_host}/{REDIS_DB}"


def _flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()


def stack_backends(kind: str, root: Path, db_prefix: str) -> tuple[str, str, list[Callable[[], None]]]:
    """(database URL, broker URL, cleanups) of a stack: "embedded" files in `root` (SQLite + kombu's
    SQLAlchemy broker), or "servers": a fresh PostgreSQL database and a flushed Redis database."""
    if kind == "embedded":
        return f"sqlite:///{root / 'stabletrain.db'}", f"sqlalchemy+sqlite:///{root / 'broker.db'}", []
    pg_base = postgres_base_url()
    broker_url = _redis_url(server_url_or_skip("STABLETRAIN_TEST_REDIS_URL"))
    database_url = create_database(pg_base, prefix=db_prefix)
    cleanups: list[Callable[[], None]] = [lambda: drop_database(pg_base, database_url)]
    _flush_redis(broker_url)
    cleanups.append(lambda: _flush_redis(broker_url))
    return database_url, broker_url, cleanups


@pytest.fixture(scope="session", params=["embedded", "servers"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A running stack; the worker's log is printed when a test of the session fails."""
    root = tmp_path_factory.mktemp(f"stack-{request.param}")
    database_url, broker_url, cleanups = stack_backends(request.param, root, "stabletrain_it")
    st = Stack(request.param, database_url, broker_url, root)
    try:
        st.migrate()
        st.start_worker()
        yield st
    finally:
        failed = request.session.testsfailed
        st.close()
        if failed:
            print(f"\n--- worker log ({request.param}) ---\n{st.log_tail()}")
        for cleanup in reversed(cleanups):
            cleanup()


@pytest.fixture(scope="session")
def corpus() -> bytes:
    """tests/data/corpus.txt (mixed English + Chinese), or a generated stand-in."""
    path = REPO / "tests" / "data" / "corpus.txt"
    if path.is_file():
        return path.read_bytes()
    return "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(2000)).encode()
