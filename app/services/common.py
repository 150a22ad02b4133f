"""Helpers shared by services: opaque cursors, owned-record lookup, non-finite floats."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, TypeVar

from flask_smorest import abort
from sqlalchemy import and_, or_, update

from app.extensions import db
from app.models import ApiKey, is_server_id
from app.services import cursors

T = TypeVar("T")


def encode_cursor(created_at: datetime, record_id: str) -> str:
    """Opaque cursor for (created_at, id) keyset paging (format and pattern: app.services.cursors)."""
    return cursors.encode_newest(created_at, record_id)


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of encode_cursor; 422 on a string that is not shaped like one (the schema checks it first)."""
    try:
        return cursors.decode_newest(cursor)
    except ValueError:
        abort(422, message="Invalid cursor.", details={"cursor": ["Not a cursor returned by this API."]})
        raise  # unreachable


def newest_first_page(stmt: Any, model: Any, limit: int, cursor: str | None) -> tuple[list[Any], str | None]:
    """Apply (created_at, id) descending keyset paging; returns (rows, next_cursor)."""
    if cursor:
        stamp, record_id = decode_cursor(cursor)
        stmt = stmt.where(or_(model.created_at < stamp, and_(model.created_at == stamp, model.id < record_id)))
    stmt = stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows = list(db.session.execute(stmt).scalars())
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1].created_at, rows[-1].id)


def lock_owner(owner_id: str) -> None:
    """Serialize one key's quota checks until the next commit or rollback.

    An UPDATE of the key's own row takes its row lock on PostgreSQL and the database write lock on
    SQLite, so a concurrent request of the same key waits here and then counts this one's committed
    rows: check-then-insert cannot overshoot a per-key limit. Other keys are not held up on PostgreSQL.
    """
    db.session.execute(update(ApiKey).where(ApiKey.id == owner_id).values(name=ApiKey.name)
                       .execution_options(synchronize_session=False))


def get_owned(model: type[T], record_id: str, owner_id: str, what: str) -> T:
    """The record if it belongs to owner_id, else 404 (another key's id looks absent).

    Only a string shaped like a server-made id reaches the database (and so any file path built
    from a record); anything else is absent without a query."""
    if not is_server_id(record_id):
        abort(404, message=f"{what} not found: not an id this server made.")
    record = db.session.get(model, record_id)
    if record is None or record.owner_id != owner_id:  # type: ignore[attr-defined]
        abort(404, message=f"{what} {record_id} not found.")
    return record  # type: ignore[return-value]


def get_owned_of_job(model: type[T], record_id: str, owner_id: str, job_id: str, what: str) -> T:
    """A record that belongs to this job (a sample, a probe) if the key owns it, else 404."""
    record = get_owned(model, record_id, owner_id, what)
    if record.job_id != job_id:  # type: ignore[attr-defined]
        abort(404, message=f"{what} {record_id} not found.")
    return record


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats become null (the row's `nonfinite` flag says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def clean_row(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """A metrics row with non-finite floats replaced by null."""
    if row is None:
        return None
    return {k: finite_or_none(v) for k, v in row.items()}


def without_nonfinite(value: Any) -> Any:
    """Deep copy of JSON-like data with non-finite floats replaced by null."""
    if isinstance(value, dict):
        return {k: without_nonfinite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nonfinite(v) for v in value]
    return finite_or_none(value)
