"""Spend a bounded share of a run's time on optional work (live diagnosis, the through-time probe)."""

from __future__ import annotations

import math
import time


class CostBudget:
    """Work that may run only after `ratio` times its own last cost has passed since it last ran.

    Run whenever due, that work takes at most ~1/ratio of the wall time, whatever it costs on this
    model and device; cheap work runs every time it is asked for. Times are host times: on a GPU
    they count launches, not kernels, which is fine for work whose kernels overlap the next step.
    """

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.last_end = -math.inf
        self.cost_s = 0.0
        self._started: float | None = None

    def due(self) -> bool:
        return time.perf_counter() - self.last_end >= self.ratio * self.cost_s

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self) -> None:
        assert self._started is not None, "stop() without start()"
        self.last_end = time.perf_counter()
        self.cost_s = self.last_end - self._started
        self._started = None
