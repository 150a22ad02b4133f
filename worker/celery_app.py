"""The Celery app that `celery -A worker.celery_app worker` loads.

Configured from the same STABLETRAIN_* environment as the API (via `create_app`).
Tasks run inside a Flask app context (as in Flask's examples/celery), so they
reach the records through `app.extensions.db`. No result backend: a job's state
lives in the database.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from datetime import datetime, timedelta
from typing import Any

import redis
from celery import Celery, Task, signals
from celery.worker.consumer import Consumer
from flask import Flask
from kombu import Exchange, Queue
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from app import create_app
from app.extensions import db
from worker import logs as worker_logs
from worker.db import utcnow
from worker.leases import bound_idle_transactions
from worker.reconciler import ReconcileReport, ReconcilerThread, reconcile, relay
from worker.service import ACTIVITY, SHUTDOWN
from worker.settings import WorkerSettings, load_settings
from worker.webhooks import prune_webhook_messages, relay_webhooks, webhook_settings

log = logging.getLogger(__name__)

# The embedded (SQLAlchemy) broker polls its table; the default 1 s adds up to a
# second of latency to every job and sample. Its transport options go to
# create_engine(), so the interval can only be set on the class.
KOMBU_SQLALCHEMY_POLL_S = 0.2
kombu_sqlalchemy.Transport.polling_interval = KOMBU_SQLALCHEMY_POLL_S

QUEUES = ("train", "samples", "webhooks")
TASK_ROUTES = {
    "stabletrain.webhook_deliver": {"queue": "webhooks"},
    "stabletrain.train_job": {"queue": "train"},
    "stabletrain.sample": {"queue": "samples"},
    "stabletrain.export": {"queue": "samples"},
    "stabletrain.lr_probe": {"queue": "samples"},
    "stabletrain.calibrate": {"queue": "train"},
}


def broker_transport_options(broker_url: str, settings: WorkerSettings) -> dict[str, Any]:
    """Per-broker options: Redis needs a visibility timeout above the longest job."""
    if broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        return {"visibility_timeout": settings.visibility_timeout_s}
    return {}  # the SQLAlchemy transport would pass unknown options to create_engine()


# kombu's consumer reconnects after 2, 4, 6 ... up to 30 s between tries: after a minute-long broker
# outage, a worker would sit out up to 30 s of the broker being back. Try every second instead.
RECONNECT_INTERVAL_S = 1.0


class PromptConsumer(Consumer):
    """Celery's consumer, reconnecting to a returning broker within a second."""

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = functools.partial(conn.ensure_connection, interval_start=RECONNECT_INTERVAL_S,
                                                   interval_step=0, interval_max=RECONNECT_INTERVAL_S)
        return super().ensure_connected(conn)


def make_celery(flask_app: Flask, settings: WorkerSettings) -> Celery:
    """Celery app whose tasks run inside `flask_app`'s app context."""

    class FlaskTask(Task):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with flask_app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery("stabletrain", task_cls=FlaskTask, include=["worker.tasks"])
    celery_app.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=broker_transport_options(settings.broker_url, settings),
        broker_connection_retry_on_startup=True,
        # never give up on the broker (the default, 100 tries, would end the worker after ~2 minutes)
        broker_connection_max_retries=None,
        worker_consumer="worker.celery_app:PromptConsumer",
        # explicit exchange + key per queue: with the defaults both queues would bind to the
        # "train" exchange and a message routed to one would also land in the other
        task_queues=tuple(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES),
        task_default_queue="train",
        task_routes=TASK_ROUTES,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        # a broker blip must not kill a training run; a redelivered duplicate is dropped by the claim
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
    )
    flask_app.extensions["celery"] = celery_app
    return celery_app


flask_app = create_app()
settings = load_settings(flask_app.config)
celery = make_celery(flask_app, settings)
with flask_app.app_context():
    bound_idle_transactions(db.engine, max(settings.lease_s, 10.0))


def engine() -> Engine:
    """The Flask-SQLAlchemy engine (same pool and SQLite pragmas as the API)."""
    with flask_app.app_context():
        return db.engine


def send(task: str, record_id: str, queue: str) -> None:
    """Publish one task by name, retrying briefly."""
    celery.send_task(task, args=[record_id], queue=queue, retry=True,
                     retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0})


class BrokerWatch:
    """When the broker last started, for brokers that may restart without their messages (Redis).

    None for the embedded broker (its messages live in a database file) and while Redis is down.
    """

    def __init__(self, broker_url: str) -> None:
        self.client = (redis.Redis.from_url(broker_url, socket_timeout=1, socket_connect_timeout=1)
                       if broker_url.startswith(("redis://", "rediss://")) else None)

    def started_at(self) -> datetime | None:
        if self.client is None:
            return None
        try:
            uptime_s = int(self.client.info("server")["uptime_in_seconds"])
        except (redis.RedisError, KeyError, ValueError):
            return None
        return utcnow() - timedelta(seconds=uptime_s)


broker_watch = BrokerWatch(settings.broker_url)
# set when this process is a worker consuming the train queue (its idleness then means lost messages)
consumes_train: list[bool] = []


# Retention is a slow chore: a worker process prunes the webhook outbox at most this often, the first
# time at a random point of that period (workers started together do not all prune at once).
PRUNE_EVERY_S = 600.0
_next_prune_at: list[float] = [time.monotonic() + random.uniform(0, PRUNE_EVERY_S)]


def reconcile_now() -> ReconcileReport:
    """One reconciler pass with this process's settings (and, when due, the webhook outbox's retention)."""
    idle_for_s = ACTIVITY.idle_for_s() if consumes_train else 0.0
    report = reconcile(utcnow(), engine=engine(), send=send, resend_after_s=settings.resend_after_s,
                       sample_timeout_s=settings.sample_timeout_s, probe_timeout_s=settings.probe_timeout_s,
                       max_attempts=settings.max_attempts,
                       idle_for_s=idle_for_s, idle_resend_s=settings.idle_resend_s)
    if time.monotonic() >= _next_prune_at[0]:
        _next_prune_at[0] = time.monotonic() + PRUNE_EVERY_S
        prune_webhook_messages(engine(), webhook_settings(flask_app.config).retention_s)
    return report


def relay_now() -> int:
    """One relay pass (the outbox's sender) with this process's settings: jobs, samples, then webhook deliveries."""
    sent = relay(utcnow(), engine=engine(), send=send, broker_started_at=broker_watch.started_at())
    return sent + relay_webhooks(engine(), send, webhook_settings(flask_app.config).resend_after_s)


_reconciler: list[ReconcilerThread] = []


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def _job_tagged_logs(logger: logging.Logger, **_: Any) -> None:
    # every line a job's run writes carries its id; JSON lines when STABLETRAIN_LOG_JSON is set
    worker_logs.configure(logger.handlers, json_lines=str(flask_app.config.get("LOG_JSON")).lower() in ("1", "true"))


@signals.worker_init.connect
def _warm_up(**_: Any) -> None:
    # torch imports its optimizer/compile machinery (~1.5 s) on the first optimizer built;
    # pay that once per process at start, not inside every worker's first job
    import torch

    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])


def declare_embedded_queues(celery_app: Celery, attempts: int = 10) -> None:
    """Create the embedded broker's tables and queue rows before the consumer starts.

    kombu's SQLAlchemy transport creates them on first use with a check-then-insert that is
    guarded by an in-process lock only: two workers starting together on a fresh broker file
    race, and the loser dies at start with an IntegrityError (or "table already exists").
    Here the loser retries and then finds what the winner made.
    """
    if not str(celery_app.conf.broker_url).startswith("sqlalchemy+"):
        return
    for attempt in range(1, attempts + 1):
        try:
            with celery_app.connection_for_write() as conn:
                channel = conn.default_channel
                for queue in celery_app.conf.task_queues:
                    queue.bind(channel).declare()
            return
        except SQLAlchemyError as exc:
            if attempt == attempts:
                raise
            log.info("declaring the embedded broker's queues raced another process (%s); retrying",
                     type(exc).__name__)
            time.sleep(0.05 * attempt)


@signals.worker_init.connect
def _declare_queues(**_: Any) -> None:
    declare_embedded_queues(celery)


@signals.worker_ready.connect
def _start_reconciler(sender: Any = None, **_: Any) -> None:
    task_consumer = getattr(sender, "task_consumer", None)
    if task_consumer is not None and "train" in {q.name for q in task_consumer.queues}:
        consumes_train.append(True)
    if settings.reconcile_every_s > 0:
        _reconciler.append(ReconcilerThread(reconcile_now, settings.reconcile_every_s))
    if settings.relay_every_s > 0:
        _reconciler.append(ReconcilerThread(relay_now, settings.relay_every_s, name="relay"))
    for thread in _reconciler:
        thread.start()


@signals.worker_shutting_down.connect
def _stop_training(**_: Any) -> None:
    # warm shutdown: the running job checkpoints at its next step and goes back to the queue;
    # our reconciler stops so it does not re-send that job to this (exiting) worker
    SHUTDOWN.set()
    for thread in _reconciler:
        thread.stop()
