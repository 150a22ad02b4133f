"""Gunicorn settings read from the repo root (serve.sh, the Dockerfile and bench/ start it here)."""

import gc

# The default access line prints the query string and the referrer, and the dashboard's
# one-time `/ui/?key=...` link would put an API key in the log: log the path only.
access_log_format = '%(h)s %(t)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms "%(a)s"'


def post_worker_init(worker):
    """Move everything loaded at start-up out of the garbage collector's reach.

    A worker holds ~120k long-lived objects (Flask, SQLAlchemy, marshmallow,
    Celery); a full collection over them took ~55 ms and stalled whichever
    request was in flight (bench/api_load.py metrics-page p99). Frozen, a
    full collection takes well under a millisecond.
    """
    gc.collect()
    gc.freeze()
