"""The Alembic revision builds the models' schema on SQLite and PostgreSQL with no diff."""

from __future__ import annotations

from pathlib import Path

import flask_migrate
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app import create_app
from app.extensions import db

TABLES = {"api_keys", "datasets", "jobs", "step_metrics", "layer_metrics", "events", "checkpoints", "samples"}


def _upgrade_and_compare(database_url: str, tmp_path: Path) -> None:
    app = create_app({
        "DATABASE_URL": database_url,
        "BROKER_URL": f"sqlalchemy+sqlite:///{tmp_path / 'broker.db'}",
        "STORAGE_DIR": str(tmp_path / "storage"),
    })
    with app.app_context():
        flask_migrate.upgrade()
        with db.engine.connect() as conn:
            assert TABLES <= set(inspect(conn).get_table_names())
            assert inspect(conn).get_unique_constraints("jobs")[0]["column_names"] == ["owner_id", "idempotency_key"]
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, db.metadata)
        assert diff == [], f"models and migration differ: {diff}"
        flask_migrate.downgrade(revision="base")
        with db.engine.connect() as conn:
            assert not TABLES & set(inspect(conn).get_table_names())
        db.engine.dispose()


def test_migration_on_sqlite(tmp_path: Path) -> None:
    _upgrade_and_compare(f"sqlite:///{tmp_path / 'fresh.db'}", tmp_path)


def test_migration_on_postgres(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = request.getfixturevalue("fresh_postgres_url")
    _upgrade_and_compare(url, tmp_path)
