"""StableTrain HTTP API: application factory."""

from __future__ import annotations

import sqlite3
from typing import Any

from flask import Flask
from sqlalchemy import event

from app import auth, inputs, logs, observability
from app.config import default_config, ensure_dirs, finalize_config
from app.errors import register_error_handlers
from app.extensions import api as smorest_api
from app.extensions import celery_client, db, init_limiter, migrate


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app: defaults, then STABLETRAIN_* environment, then test overrides."""
    app = Flask(__name__)
    app.config.from_mapping(default_config())
    app.config.from_prefixed_env("STABLETRAIN")
    if test_config:
        app.config.from_mapping(test_config)
    finalize_config(app.config)
    ensure_dirs(app.config)
    logs.init_app(app)
    _init_extensions(app)
    inputs.init_app(app)  # after auth and the limiter: 401 and 429 come first
    _register_blueprints(app)
    register_error_handlers(app)
    from app import cli

    cli.init_app(app)
    return app


def _init_extensions(app: Flask) -> None:
    db.init_app(app)
    observability.init_app(app)
    with app.app_context():
        if db.engine.dialect.name == "sqlite":
            event.listen(db.engine, "connect", _sqlite_pragmas)
    migrate.init_app(app, db, render_as_batch=True, directory=str(_migrations_dir()))
    auth.init_app(app)  # before the limiter so the key is known, and 401 beats 429
    from app.ops import bp as ops_bp

    init_limiter(app, exempt=(ops_bp,))
    smorest_api.init_app(app)
    celery_client.init_app(app)


def _migrations_dir() -> Any:
    from app.config import REPO_ROOT

    return REPO_ROOT / "migrations"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """WAL + busy timeout so the API and the worker can share one SQLite file."""
    if not isinstance(dbapi_conn, sqlite3.Connection):
        return
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _register_blueprints(app: Flask) -> None:
    from app.api.checkpoints import blp as checkpoints_blp
    from app.api.datasets import blp as datasets_blp
    from app.api.jobs import blp as jobs_blp
    from app.api.metrics import blp as metrics_blp
    from app.api.probes import blp as probes_blp
    from app.api.samples import blp as samples_blp
    from app.api.webhooks import blp as webhooks_blp
    from app.ops import bp as ops_bp

    for blp in (datasets_blp, jobs_blp, metrics_blp, checkpoints_blp, samples_blp, probes_blp, webhooks_blp):
        smorest_api.register_blueprint(blp)
    app.register_blueprint(ops_bp)
    from app.ui import init_app as init_ui  # the /ui dashboard and /v1/jobs/{id}/plots/{name}.png
    init_ui(app)
