"""Shared pytest fixtures: `app` (temp SQLite, or PostgreSQL when configured), `client`, `runner`.

The `app` fixture is parametrized over database backends: `sqlite` always, `postgres` when
STABLETRAIN_TEST_POSTGRES_URL is set (a fresh database is created for the session and dropped
after). With CI=true and no PostgreSQL URL, the postgres variant fails instead of skipping.
Per-test config overrides: `@pytest.mark.app_config(MAX_DATASET_BYTES=100)`.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from app import create_app
from app.extensions import db

BACKENDS = ["sqlite", "postgres"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "app_config(**overrides): config overrides for the app fixture")


def postgres_base_url() -> str:
    """STABLETRAIN_TEST_POSTGRES_URL, or skip (fail under CI=true) when it is missing."""
    url = os.environ.get("STABLETRAIN_TEST_POSTGRES_URL")
    if url:
        return url
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true but STABLETRAIN_TEST_POSTGRES_URL is not set: PostgreSQL tests must run in CI")
    pytest.skip("set STABLETRAIN_TEST_POSTGRES_URL (e.g. postgresql+psycopg2://postgres@127.0.0.1:5432/test) "
                "to run the PostgreSQL variant")
    raise AssertionError  # unreachable


def create_database(base_url: str, prefix: str = "stabletrain_t") -> str:
    """Create a fresh, uniquely named database next to base_url; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(base_url).set(database=name).render_as_string(hide_password=False)


def drop_database(base_url: str, url: str) -> None:
    """Drop a database made by create_database."""
    name = make_url(url).database
    assert name and re.fullmatch(r"[a-z0-9_]+", name)
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session (schema made by the first app)."""
    base = postgres_base_url()
    url = create_database(base)
    yield url
    drop_database(base, url)


def _truncate_all() -> None:
    names = ", ".join(f'"{t.name}"' for t in db.metadata.sorted_tables)
    db.session.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    db.session.commit()


def release_app(app: Flask, backend: str) -> None:
    """End a test app: its session closed, PostgreSQL's rows removed for the next test, its pool closed."""
    with app.app_context():
        db.session.remove()
        if backend == "postgres":
            _truncate_all()
        db.engine.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Database backend of this test run."""
    return request.param


@pytest.fixture
def app(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[Flask]:
    """App on a temp database, temp storage and a temp SQLite (kombu) broker."""
    config: dict[str, Any] = {
        "TESTING": True,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'test.db'}",
        "BROKER_URL": f"sqlalchemy+sqlite:///{tmp_path / 'broker.db'}",
        "STORAGE_DIR": str(tmp_path / "storage"),
        "RATELIMIT_STORAGE_URI": "memory://",
        "SAMPLE_POLL_S": 0.05,
    }
    if backend == "postgres":
        config["DATABASE_URL"] = request.getfixturevalue("postgres_url")
    marker = request.node.get_closest_marker("app_config")
    if marker:
        config.update(marker.kwargs)
    app = create_app(config)
    with app.app_context():
        db.create_all()
    yield app
    release_app(app, backend)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Test client of the app."""
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    """CLI runner of the app."""
    return app.test_cli_runner()


def create_key(runner: FlaskCliRunner, name: str = "test") -> tuple[str, str]:
    """Create an API key through `flask keys create`; returns (id, secret)."""
    result = runner.invoke(args=["keys", "create", name])
    assert result.exit_code == 0, result.output
    fields = dict(line.split(": ", 1) for line in result.output.strip().splitlines())
    return fields["id"], fields["key"]


@pytest.fixture
def make_auth(runner: FlaskCliRunner) -> Any:
    """Factory: a fresh key's Authorization header."""

    def make(name: str = "test") -> dict[str, str]:
        return {"Authorization": f"Bearer {create_key(runner, name)[1]}"}

    return make


@pytest.fixture
def auth(make_auth: Any) -> dict[str, str]:
    """Authorization header of a fresh key."""
    return make_auth("primary")


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """An empty PostgreSQL database for one test, dropped after it."""
    base = postgres_base_url()
    url = create_database(base, prefix="stabletrain_fresh")
    yield url
    drop_database(base, url)
