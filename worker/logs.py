"""Worker logging: every line written while a job (or sample) runs carries its id.

The id travels in a context variable set by the task, and a filter copies it
onto each record, so engine and worker messages need not repeat it. With
STABLETRAIN_LOG_JSON=1 the lines are JSON objects (the API's formatter).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from app.logs import JsonFormatter

# Immutable pairs, so a default shared by every context can never be changed in place.
_current: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("stabletrain_log_context", default=())

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s"


@contextmanager
def log_context(**ids: str) -> Iterator[None]:
    """Tag every log record made inside the block (this thread) with these ids."""
    token = _current.set(tuple({**dict(_current.get()), **ids}.items()))
    try:
        yield
    finally:
        _current.reset(token)


class ContextFilter(logging.Filter):
    """Copies the current ids (job_id, sample_id) onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = dict(_current.get())
        for key, value in ids.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        record.context = "".join(f" [{k}={v}]" for k, v in ids.items())
        return True


def configure(handlers: list[logging.Handler], json_lines: bool) -> None:
    """Give the worker's handlers the id filter and the text or JSON format."""
    for handler in handlers:
        handler.addFilter(ContextFilter())
        handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
