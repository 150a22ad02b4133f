"""One retry loop with exponential backoff, for the worker's waits on an outage (database, bucket)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def retry_with_backoff(work: Callable[[], T], *, retryable: Callable[[Exception], bool], deadline_s: float,
                       describe: Callable[[Exception], str], first_delay_s: float, max_delay_s: float,
                       sleep: Callable[[float], None] = time.sleep,
                       stop_waiting: Callable[[], bool] = lambda: False) -> T:
    """Run `work`; while it raises a `retryable` error, wait (doubling from `first_delay_s` up to `max_delay_s`)
    and run it again, for up to `deadline_s`. Past that, or once `stop_waiting()`, the last error is raised.

    Hand-written rather than tenacity: the worker's two callers need an injectable sleep and an early stop,
    which is all this is."""
    give_up_at = time.monotonic() + deadline_s
    delay = first_delay_s
    while True:
        try:
            return work()
        except Exception as exc:
            if not retryable(exc) or time.monotonic() + delay > give_up_at or stop_waiting():
                raise
            log.warning("%s; retrying in %.1f s", describe(exc), delay)
            sleep(delay)
            delay = min(delay * 2, max_delay_s)
