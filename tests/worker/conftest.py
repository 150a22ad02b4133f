"""Worker tests run against real databases: a SQLite file and (when configured) PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import Engine, delete

from app import create_app
from app.extensions import db
from worker.settings import WorkerSettings, load_settings


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def flask_app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    """The API's app on a fresh database of each kind, with the schema created from the models."""
    root = tmp_path_factory.mktemp(f"worker-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{root / 'stabletrain.db'}"
    else:  # the session's fresh database from tests/conftest.py (skips, or fails under CI, without a URL)
        url = request.getfixturevalue("postgres_url")
    with _app(url, root) as app:
        yield app


@contextmanager
def _app(url: str, root: Path) -> Iterator[Flask]:
    app = create_app({
        "TESTING": True,
        "DATABASE_URL": url,
        "BROKER_URL": f"sqlalchemy+sqlite:///{root / 'broker.db'}",
        "STORAGE_DIR": str(root / "storage"),
        "RATELIMIT_ENABLED": False,
    })
    with app.app_context():
        db.create_all()
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture
def engine(flask_app: Flask) -> Iterator[Engine]:
    """The app's engine, with every table emptied after the test."""
    with flask_app.app_context():
        eng = db.engine
    yield eng
    with eng.begin() as conn:
        for table in reversed(db.metadata.sorted_tables):
            conn.execute(delete(table))


@pytest.fixture
def settings(flask_app: Flask) -> WorkerSettings:
    """Worker settings with short leases so tests run in seconds."""
    base = load_settings(flask_app.config)
    return WorkerSettings(**{**base.__dict__, "lease_s": 30.0, "heartbeat_s": 0.05, "worker_id": "test-worker",
                             "device": "cpu", "db_retry_s": 10.0})
