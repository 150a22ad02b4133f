"""Small database helpers shared by the worker: dialect-aware upsert, retries, UTC time."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError

from worker.backoff import retry_with_backoff

log = logging.getLogger(__name__)

T = TypeVar("T")

# SQLite allows 32766 bound parameters per statement; stay far below it.
UPSERT_CHUNK_ROWS = 500


def utcnow() -> datetime:
    """Current UTC time, timezone-aware."""
    return datetime.now(timezone.utc)


def upsert(
    conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str]
) -> None:
    """Insert rows, overwriting the non-key columns of rows whose `keys` already exist."""
    if not rows:
        return
    dialect = conn.dialect.name
    if dialect == "postgresql":
        insert_fn: Callable[..., Any] = postgresql.insert
    elif dialect == "sqlite":
        insert_fn = sqlite.insert
    else:  # pragma: no cover - only the two supported databases
        raise RuntimeError(f"upsert not supported on {dialect}")
    columns = [c for c in rows[0] if c not in keys]
    for start in range(0, len(rows), UPSERT_CHUNK_ROWS):
        stmt = insert_fn(table).values(list(rows[start : start + UPSERT_CHUNK_ROWS]))
        update = {c: stmt.excluded[c] for c in columns}
        stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_=update) if update else (
            stmt.on_conflict_do_nothing(index_elements=list(keys))
        )
        conn.execute(stmt)


def is_transient(exc: BaseException) -> bool:
    """True for errors that a retry on a fresh connection may cure (server restart, lock)."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def with_retry(
    engine: Engine,
    work: Callable[[Connection], T],
    *,
    deadline_s: float,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    first_delay_s: float = 0.2,
    max_delay_s: float = 5.0,
) -> T:
    """Run `work` in one transaction, retrying transient errors with backoff for `deadline_s`."""
    def in_transaction() -> T:
        with engine.begin() as conn:
            return work(conn)

    return retry_with_backoff(
        in_transaction, retryable=lambda exc: isinstance(exc, DBAPIError) and is_transient(exc),
        describe=lambda exc: f"database write {what} failed ({getattr(exc, 'orig', exc)})", deadline_s=deadline_s,
        first_delay_s=first_delay_s, max_delay_s=max_delay_s, sleep=sleep)
