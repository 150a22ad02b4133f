"""Readiness checks of the database and the broker."""

from __future__ import annotations

import logging

from kombu import Connection
from sqlalchemy import text

from app.extensions import broker_transport_options, db

log = logging.getLogger(__name__)


def check_database() -> str | None:
    """None when `SELECT 1` works, else the reason."""
    try:
        db.session.execute(text("SELECT 1"))
        db.session.rollback()
        return None
    except Exception as exc:  # any driver error means "down"
        db.session.rollback()
        log.warning("database check failed: %s", exc)
        return type(exc).__name__


def check_broker(url: str, timeout_s: float) -> str | None:
    """None when the broker accepts a connection within timeout_s, else the reason."""
    options = broker_transport_options(url, timeout_s)
    try:
        with Connection(url, connect_timeout=timeout_s, transport_options=options) as conn:
            conn.ensure_connection(max_retries=0, timeout=timeout_s)
        return None
    except Exception as exc:
        log.warning("broker check failed: %s", exc)
        return type(exc).__name__


def check_storage() -> str | None:
    """None when the store (folder or bucket) can be used, else a short reason; the detail (paths,
    bucket, endpoint) goes to the log, not to this unauthenticated answer."""
    from app.services.storage import storage

    try:
        store = storage()
        problem = store.check()
    except Exception as exc:  # e.g. a STORAGE_URL the store cannot be built from
        log.warning("storage check failed: %s", exc)
        return type(exc).__name__
    if problem is None:
        return None
    log.warning("storage check failed: %s", problem)
    return "unreachable" if store.is_remote else "not writable"
