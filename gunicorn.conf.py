"""Gunicorn settings read from the repo root (serve.sh, the Dockerfile and bench/ start it here)."""

import gc


def post_worker_init(worker):
    """Move everything loaded at start-up out of the garbage collector's reach.

    A worker holds ~120k long-lived objects (Flask, SQLAlchemy, marshmallow,
    Celery); a full collection over them took ~55 ms and stalled whichever
    request was in flight (bench/api_load.py metrics-page p99). Frozen, a
    full collection takes well under a millisecond.
    """
    gc.collect()
    gc.freeze()
