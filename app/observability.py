"""Prometheus metrics: request counts and latency by endpoint, jobs by status."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from flask import Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.extensions import db
from app.models import JOB_STATUSES, Job

access_log = logging.getLogger("app.access")


class JobsByStatus(Collector):
    """Reads job counts per status at scrape time (runs inside the /metrics request)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("stabletrain_jobs", "Jobs by status", labels=["status"])
        rows = dict(db.session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        for status in JOB_STATUSES:
            gauge.add_metric([status], float(rows.get(status, 0)))
        yield gauge


def init_app(app: Flask) -> None:
    """Create this app's registry and the request hooks that feed it."""
    registry = CollectorRegistry()
    requests = Counter("stabletrain_http_requests", "HTTP requests", ["method", "endpoint", "status"],
                       registry=registry)
    latency = Histogram("stabletrain_http_request_seconds", "HTTP request latency", ["method", "endpoint"],
                        registry=registry)
    registry.register(JobsByStatus())
    app.extensions["stabletrain_metrics"] = (registry, requests, latency)
    app.before_request(_start_timer)
    app.after_request(_observe)


def _start_timer() -> None:
    g.request_started = time.perf_counter()


def _observe(response: Response) -> Response:
    _registry, requests, latency = current_app.extensions["stabletrain_metrics"]
    endpoint = request.endpoint or "unknown"
    requests.labels(request.method, endpoint, str(response.status_code)).inc()
    started = g.get("request_started")
    if started is not None:
        elapsed = time.perf_counter() - started
        latency.labels(request.method, endpoint).observe(elapsed)
        access_log.info("%s %s %s", request.method, request.path, response.status_code,
                        extra={"method": request.method, "path": request.path, "status": response.status_code,
                               "duration_ms": round(elapsed * 1000, 2)})
    return response


def registry() -> CollectorRegistry:
    """The current app's Prometheus registry."""
    return current_app.extensions["stabletrain_metrics"][0]
