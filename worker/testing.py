"""Helpers for tests that run against real databases and brokers (like flask.testing).

Not imported by the service itself.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str, every_s: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


def server_url_or_skip(variable: str) -> str:
    """URL of a test server from the environment; required in CI, else the test is skipped."""
    url = os.environ.get(variable)
    if url:
        return url
    if os.environ.get("CI") == "true":
        pytest.fail(f"{variable} must be set when CI=true")
    pytest.skip(f"set {variable} to run the variant against that server")


@contextmanager
def temporary_postgres_database(base_url: str) -> Iterator[str]:
    """Create a fresh database on the server of `base_url`, yield its URL, drop it afterwards."""
    name = f"stabletrain_test_{secrets.token_hex(6)}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(base_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
