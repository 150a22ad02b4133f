"""Helpers for tests that run against real databases and brokers (like flask.testing).

Not imported by the service itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

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
