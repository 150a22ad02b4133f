"""The Alembic revisions build the models' schema on SQLite and PostgreSQL with no diff, and each step
goes down and up again keeping the data (0001 -> 0002 -> 0001 -> 0002)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flask_migrate
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from flask import Flask
from sqlalchemy import inspect, text

from app import create_app
from app.extensions import db

TABLES = {"api_keys", "datasets", "dataset_files", "jobs", "step_metrics", "layer_metrics", "activation_metrics",
          "events", "checkpoints",
          "samples"}
POSITION_INDEX = "ix_layer_metrics_job_step_position"


def _app(database_url: str, tmp_path: Path) -> Flask:
    return create_app({
        "DATABASE_URL": database_url,
        "BROKER_URL": f"sqlalchemy+sqlite:///{tmp_path / 'broker.db'}",
        "STORAGE_DIR": str(tmp_path / "storage"),
    })


def _assert_no_diff() -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, db.metadata)
    assert diff == [], f"models and migration differ: {diff}"


def _layer_columns() -> set[str]:
    with db.engine.connect() as conn:
        return {c["name"] for c in inspect(conn).get_columns("layer_metrics")}


def insert_key_and_job(conn: Any, job_id: str = "job_1", spec: str = "{}", with_key: bool = True) -> None:
    """Raw rows of a key ('key_1') and one succeeded job of it at step 10, as any revision's schema has them."""
    if with_key:
        conn.execute(text("INSERT INTO api_keys (id, name, key_hash, prefix, created_at) "
                          "VALUES ('key_1', 'k', :h, 'st_', CURRENT_TIMESTAMP)"), {"h": "0" * 64})
    conn.execute(text("INSERT INTO jobs (id, owner_id, name, spec, status, created_at, updated_at, step, max_steps, "
                      "tokens_seen, health, attempts, cancel_requested) VALUES (:id, 'key_1', 'j', :spec, "
                      "'succeeded', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 10, 10, 0, 'ok', 1, false)"),
                 {"id": job_id, "spec": spec})


def _layer_indexes() -> set[str]:
    with db.engine.connect() as conn:
        return {i["name"] for i in inspect(conn).get_indexes("layer_metrics")}


def _round_trip_layer_position(database_url: str, tmp_path: Path) -> None:
    """0001 with a layer row -> 0002 (row kept, position null) -> write a position -> back to 0001
    (column and index gone, rows kept) -> 0002 again (no diff against the models)."""
    app = _app(database_url, tmp_path)
    with app.app_context():
        flask_migrate.upgrade(revision="0001")
        assert "position" not in _layer_columns()
        with db.engine.begin() as conn:
            insert_key_and_job(conn)
            conn.execute(text("INSERT INTO layer_metrics (job_id, step, layer, grad_norm) VALUES "
                              "('job_1', 10, 'head.weight', 0.5), ('job_1', 10, 'embed.weight', 0.25)"))

        flask_migrate.upgrade(revision="0002")
        assert "position" in _layer_columns() and POSITION_INDEX in _layer_indexes()
        with db.engine.begin() as conn:
            rows = conn.execute(text("SELECT layer, grad_norm, position FROM layer_metrics ORDER BY layer")).all()
            assert [tuple(r) for r in rows] == [("embed.weight", 0.25, None), ("head.weight", 0.5, None)]
            conn.execute(text("INSERT INTO layer_metrics (job_id, step, layer, grad_norm, position) VALUES "
                              "('job_1', 20, 'embed.weight', 0.125, 0)"))

        flask_migrate.downgrade(revision="0001")
        assert "position" not in _layer_columns() and POSITION_INDEX not in _layer_indexes()
        with db.engine.connect() as conn:
            rows = conn.execute(text("SELECT step, layer, grad_norm FROM layer_metrics ORDER BY step, layer")).all()
        assert [tuple(r) for r in rows] == [(10, "embed.weight", 0.25), (10, "head.weight", 0.5),
                                            (20, "embed.weight", 0.125)]

        flask_migrate.upgrade()
        assert "position" in _layer_columns() and POSITION_INDEX in _layer_indexes()
        _assert_no_diff()
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM layer_metrics WHERE position IS NULL")).scalar_one() == 3
            fks = inspect(conn).get_foreign_keys("layer_metrics")
        assert [(f["referred_table"], f["options"].get("ondelete")) for f in fks] == [("jobs", "CASCADE")]
        flask_migrate.downgrade(revision="base")
        db.engine.dispose()


def _upgrade_and_compare(database_url: str, tmp_path: Path) -> None:
    app = _app(database_url, tmp_path)
    with app.app_context():
        flask_migrate.upgrade()
        with db.engine.connect() as conn:
            assert TABLES <= set(inspect(conn).get_table_names())
            assert inspect(conn).get_unique_constraints("jobs")[0]["column_names"] == ["owner_id", "idempotency_key"]
        _assert_no_diff()
        flask_migrate.downgrade(revision="base")
        with db.engine.connect() as conn:
            assert not TABLES & set(inspect(conn).get_table_names())
        db.engine.dispose()


def test_migration_on_sqlite(tmp_path: Path) -> None:
    _upgrade_and_compare(f"sqlite:///{tmp_path / 'fresh.db'}", tmp_path)


def test_migration_on_postgres(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = request.getfixturevalue("fresh_postgres_url")
    _upgrade_and_compare(url, tmp_path)


def test_layer_position_round_trip_on_sqlite(tmp_path: Path) -> None:
    _round_trip_layer_position(f"sqlite:///{tmp_path / 'round.db'}", tmp_path)


def test_layer_position_round_trip_on_postgres(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = request.getfixturevalue("fresh_postgres_url")
    _round_trip_layer_position(url, tmp_path)


def _round_trip_0006(database_url: str, tmp_path: Path) -> None:
    """0003 with datasets, a job and its metric rows -> 0006 (file counts filled from the rows, every row
    kept: jobs is altered in place, not rebuilt, so nothing cascades) -> 0003 (rows kept) -> head."""
    app = _app(database_url, tmp_path)
    with app.app_context():
        flask_migrate.upgrade(revision="0003")
        with db.engine.begin() as conn:
            conn.execute(text("INSERT INTO api_keys (id, name, key_hash, prefix, created_at) "
                              "VALUES ('key_1', 'k', :h, 'st_', CURRENT_TIMESTAMP)"), {"h": "0" * 64})
            conn.execute(text("INSERT INTO datasets (id, owner_id, name, bytes, sha256, created_at) VALUES "
                              "('ds_1', 'key_1', 'a', 5, :a, CURRENT_TIMESTAMP), "
                              "('ds_2', 'key_1', 'b', 5, :a, CURRENT_TIMESTAMP), "
                              "('ds_3', 'key_1', 'c', 7, :b, CURRENT_TIMESTAMP)"), {"a": "a" * 64, "b": "b" * 64})
            conn.execute(text("INSERT INTO jobs (id, owner_id, name, spec, status, idempotency_key, created_at, "
                              "updated_at, step, max_steps, tokens_seen, health, attempts, cancel_requested) VALUES "
                              "('job_1', 'key_1', 'j', '{}', 'succeeded', 'idem', CURRENT_TIMESTAMP, "
                              "CURRENT_TIMESTAMP, 2, 2, 0, 'ok', 1, false)"))
            conn.execute(text("INSERT INTO layer_metrics (job_id, step, layer, grad_norm) VALUES "
                              "('job_1', 1, 'head.weight', 0.5), ('job_1', 2, 'head.weight', 0.25)"))

        def kept() -> tuple[int, int, str]:
            with db.engine.connect() as conn:
                return (conn.execute(text("SELECT count(*) FROM layer_metrics")).scalar_one(),
                        conn.execute(text("SELECT count(*) FROM jobs")).scalar_one(),
                        conn.execute(text("SELECT idempotency_key FROM jobs")).scalar_one())

        flask_migrate.upgrade(revision="0006")
        assert kept() == (2, 1, "idem")
        with db.engine.connect() as conn:
            refs = conn.execute(text("SELECT sha256, refs FROM dataset_files ORDER BY sha256")).all()
            assert [tuple(r) for r in refs] == [("a" * 64, 2), ("b" * 64, 1)]
            assert conn.execute(text("SELECT idempotency_hash FROM jobs")).scalar_one() is None
        flask_migrate.downgrade(revision="0003")
        assert kept() == (2, 1, "idem")
        with db.engine.connect() as conn:
            assert "dataset_files" not in inspect(conn).get_table_names()
            assert "idempotency_hash" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
        flask_migrate.upgrade()
        assert kept() == (2, 1, "idem")
        _assert_no_diff()
        flask_migrate.downgrade(revision="base")
        db.engine.dispose()


def test_service_hardening_round_trip_on_sqlite(tmp_path: Path) -> None:
    _round_trip_0006(f"sqlite:///{tmp_path / 'hard.db'}", tmp_path)


def test_service_hardening_round_trip_on_postgres(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    _round_trip_0006(request.getfixturevalue("fresh_postgres_url"), tmp_path)


def _legacy_hidden(database_url: str, tmp_path: Path) -> None:
    """0007 with an old transformer spec (no depth_scaled_init: hidden meant nothing, the FFN was 4 * d_model),
    a new one and an lstm -> 0008: only the old transformer's hidden becomes 4 * d_model."""
    app = _app(database_url, tmp_path)
    specs = {
        "job_old": {"model": {"arch": "transformer", "d_model": 48, "hidden": 128}},
        "job_new": {"model": {"arch": "transformer", "d_model": 48, "hidden": 96, "depth_scaled_init": False}},
        "job_rnn": {"model": {"arch": "lstm", "d_model": 48, "hidden": 128}},
    }
    with app.app_context():
        flask_migrate.upgrade(revision="0007")
        with db.engine.begin() as conn:
            for job_id, spec in specs.items():
                insert_key_and_job(conn, job_id, json.dumps(spec), with_key=job_id == "job_old")
        flask_migrate.upgrade(revision="0008")
        with db.engine.connect() as conn:
            rows = dict(conn.execute(text("SELECT id, spec FROM jobs")).all())
        hidden = {job_id: (json.loads(s) if isinstance(s, str) else s)["model"]["hidden"] for job_id, s in rows.items()}
        assert hidden == {"job_old": 192, "job_new": 96, "job_rnn": 128}
        flask_migrate.downgrade(revision="base")
        db.engine.dispose()


def test_legacy_transformer_hidden_on_sqlite(tmp_path: Path) -> None:
    _legacy_hidden(f"sqlite:///{tmp_path / 'legacy.db'}", tmp_path)


def test_legacy_transformer_hidden_on_postgres(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    _legacy_hidden(request.getfixturevalue("fresh_postgres_url"), tmp_path)
