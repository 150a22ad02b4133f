"""Celery tasks, thin: they pass ids to worker.service, which holds the logic."""

from __future__ import annotations

import os
from typing import Any

from celery import shared_task
from celery.exceptions import Reject
from flask import current_app
from sqlalchemy.exc import OperationalError

from app.extensions import db
from worker.engine.tokenizers import TOKENIZER_CACHE_ENV
from worker.exports import run_export
from worker.logs import log_context
from worker.probes import run_calibration, run_probe
from worker.service import SHUTDOWN, run_sample, run_train_job
from worker.settings import load_settings
from worker.webhooks import WEBHOOK_TASK, deliver, webhook_settings

# A database that is down at claim time: retry the message; once claimed, the
# lease + reconciler take over, so retries never run a job twice at once.
RETRY = {"autoretry_for": (OperationalError,), "retry_backoff": 2, "retry_backoff_max": 60, "max_retries": 8}


def _requeue_if_shutting_down() -> None:
    """A task delivered while this worker exits is left to another worker."""
    if SHUTDOWN.is_set():
        raise Reject("worker shutting down", requeue=True)


@shared_task(name="stabletrain.train_job", ignore_result=True, **RETRY)
def train_job(job_id: str) -> str:
    """Claim and train one job, reporting into its records."""
    _requeue_if_shutting_down()
    settings = load_settings(current_app.config)
    # BPE tokenizers trained on a dataset are kept in storage, so a retry or another job of the same
    # dataset and settings reads them instead of training again (the engine reads this variable; with
    # a bucket it is this host's cache folder, synced with the bucket by worker.artifacts).
    os.environ[TOKENIZER_CACHE_ENV] = str(settings.storage.local_dir("tokenizers"))
    with log_context(job_id=job_id):
        return run_train_job(db.engine, job_id, settings)


@shared_task(name="stabletrain.sample", ignore_result=True, **RETRY)
def sample(sample_id: str) -> str:
    """Generate text for one sample request."""
    _requeue_if_shutting_down()
    with log_context(sample_id=sample_id):
        return run_sample(db.engine, sample_id, load_settings(current_app.config))


@shared_task(name="stabletrain.export", ignore_result=True)
def export(job_id: str, step: int, sha256: str, fmt: str) -> str:
    """Write one checkpoint's export (hf archive or weights-only safetensors) into storage."""
    _requeue_if_shutting_down()
    with log_context(job_id=job_id):
        return run_export(load_settings(current_app.config).storage, job_id, int(step), sha256, fmt)


@shared_task(name="stabletrain.lr_probe", ignore_result=True, **RETRY)
def lr_probe(probe_id: str) -> str:
    """Run one LR range test of a job's spec (writes only the probe's record)."""
    _requeue_if_shutting_down()
    with log_context(probe_id=probe_id):
        return run_probe(db.engine, probe_id, load_settings(current_app.config))


@shared_task(name="stabletrain.calibrate", ignore_result=True)
def calibrate(reason: str = "") -> str:
    """Measure this training worker's throughput for dry-run wall-time estimates (`reason`: who asked)."""
    _requeue_if_shutting_down()
    return run_calibration(db.engine, load_settings(current_app.config))


@shared_task(name=WEBHOOK_TASK, bind=True, ignore_result=True, acks_late=True, max_retries=None, **{
    k: v for k, v in RETRY.items() if k != "max_retries"})
def webhook_deliver(self: Any, delivery_id: str) -> str:
    """One attempt of a webhook delivery; after a failure Celery runs it again when the schedule says.

    The delivery's own row decides (worker.webhooks): a duplicate or early message claims nothing, and
    the relay re-sends a due delivery whose retry message was lost with the broker."""
    with log_context(delivery_id=delivery_id):
        outcome, delay = deliver(db.engine, delivery_id, webhook_settings(current_app.config))
    if delay is not None:
        raise self.retry(countdown=delay)
    return outcome
