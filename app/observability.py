"""Prometheus metrics: request counts and latency by endpoint, jobs by status.

Under gunicorn every worker process counts its own requests. With
PROMETHEUS_MULTIPROC_DIR set (gunicorn.conf.py sets and empties it at start)
prometheus_client keeps each process's values in files there, and a scrape
merges the files of every worker, live or exited, so one scrape of any worker
sees the whole server's totals. Without it (tests, `flask run`) the app's own
registry is used.

No metric carries a tenant: labels are method, endpoint (the route's name,
never the URL with its ids), status and job status. Nothing per key is exposed,
so /metrics needs no API key; STABLETRAIN_METRICS_TOKEN, when set, makes it
require `Authorization: Bearer <token>` for deployments where the scrape port
is reachable from outside (app/ops.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

from flask import Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.extensions import db
from app.models import JOB_STATUSES, Job

access_log = logging.getLogger("app.access")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


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
    """What one scrape exposes: every process's values in multiprocess mode, else this app's registry."""
    if not os.environ.get(MULTIPROC_ENV):
        return current_app.extensions["stabletrain_metrics"][0]
    merged = CollectorRegistry()  # a fresh one per scrape, as prometheus_client's multiprocess docs say
    MultiProcessCollector(merged)
    merged.register(JobsByStatus())
    return merged
