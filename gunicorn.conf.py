"""Gunicorn settings read from the repo root (serve.sh, the Dockerfile and bench/ start it here)."""

import gc
import glob
import os
import shutil
import tempfile

# Prometheus multiprocess mode: each worker writes its metric values to files in this folder and a
# scrape merges them all (app/observability.py). It must be in the environment before a worker
# imports prometheus_client, so it is set here, in the master, before any worker is forked.
_PRIVATE_METRICS_DIR = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _PRIVATE_METRICS_DIR = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="stabletrain-prometheus-")

# The default access line prints the query string and the referrer, and the dashboard's
# one-time `/ui/?key=...` link would put an API key in the log: log the path only.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms "%(a)s"'


def on_starting(server):
    """Empty the metrics folder: counts left by an earlier run of the server must not be added in."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(folder, exist_ok=True)
    for path in glob.glob(os.path.join(folder, "*.db")):
        os.remove(path)


def on_exit(server):
    """Remove the metrics folder this file made (one given in the environment is the caller's)."""
    if _PRIVATE_METRICS_DIR:
        shutil.rmtree(_PRIVATE_METRICS_DIR, ignore_errors=True)


def child_exit(server, worker):
    """A worker exited (crash, timeout, max_requests): its counters stay summed, its live gauges go."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    """Move everything loaded at start-up out of the garbage collector's reach.

    A worker holds ~120k long-lived objects (Flask, SQLAlchemy, marshmallow,
    Celery); a full collection over them took ~55 ms and stalled whichever
    request was in flight (bench/api_load.py metrics-page p99). Frozen, a
    full collection takes well under a millisecond.
    """
    gc.collect()
    gc.freeze()
