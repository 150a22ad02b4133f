"""Column helpers shared by the records."""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    """Current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


ID_PATTERN = re.compile(r"(key|ds|job|smp|prb|wh|msg|dlv)_[0-9a-f]{24}")


def is_server_id(value: object, prefix: str | None = None) -> bool:
    """True for a string shaped like an id new_id made (optionally with this prefix)."""
    if not isinstance(value, str):
        return False
    match = ID_PATTERN.fullmatch(value)
    return match is not None and (prefix is None or match.group(1) == prefix)


def new_id(prefix: str) -> str:
    """Server-made id: prefix + 24 hex chars (e.g. job_0123...)."""
    return f"{prefix}_{secrets.token_hex(12)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamp stored as UTC and always read back timezone-aware (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)
