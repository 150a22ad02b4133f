"""The database's clock as a SQL expression: lease times are the database's, not each host's.

Workers on several hosts compare and extend leases; a host whose clock is off by a minute
would otherwise take over live jobs (clock ahead) or keep dead ones (clock behind). Every
lease time is written and compared as `db_now(...)`, evaluated by the database server.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Float, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from app.models._common import UTCDateTime


class db_now(FunctionElement[Any]):  # noqa: N801 - used like a SQL function
    """The database server's current UTC time plus `offset_s` seconds (sub-second precision)."""

    type = UTCDateTime()
    inherit_cache = True
    name = "db_now"

    def __init__(self, offset_s: float = 0.0) -> None:
        super().__init__(literal(float(offset_s), Float()))


@compiles(db_now, "postgresql")
def _postgresql_now(element: db_now, compiler: Any, **kw: Any) -> str:
    # transaction start time: every lease time one transaction writes or compares is the same instant
    return f"(CURRENT_TIMESTAMP + {compiler.process(element.clauses, **kw)} * INTERVAL '1 second')"


@compiles(db_now, "sqlite")
def _sqlite_now(element: db_now, compiler: Any, **kw: Any) -> str:
    # same text layout as SQLAlchemy's stored DATETIME (lexical order = time order), to the millisecond
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', {compiler.process(element.clauses, **kw)} || ' seconds')"
