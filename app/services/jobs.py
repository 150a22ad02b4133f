"""Job submission, reading, listing, cancellation, pause and resume."""

from __future__ import annotations

import logging
from typing import Any

from flask import current_app
from flask_smorest import abort
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from app.extensions import db
from app.models import (
    LIVE_STATUSES,
    TERMINAL_STATUSES,
    Dataset,
    Event,
    Job,
    StepMetric,
    is_server_id,
    new_id,
    utcnow,
)
from app.schemas.spec import spec_to_json
from app.services.common import clean_row, get_owned, lock_owner, newest_first_page
from app.services.metrics import STEP_COLUMNS
from app.services.params import estimate_params, vocab_estimate
from app.services.queue import TRAIN_QUEUE, TRAIN_TASK, publish
from app.services.webhook_events import record_job_event

log = logging.getLogger(__name__)



def _invalid(path: str, message: str) -> None:
    abort(422, message=f"Validation failed: {path} {message}.", details={path: [message]})


def check_limits(spec: dict[str, Any]) -> None:
    """Server limits beyond the spec's own ranges (size, steps, context)."""
    cfg, training = current_app.config, spec["training"]
    if training["max_steps"] > int(cfg["MAX_STEPS"]):
        _invalid("training.max_steps", f"must be at most {cfg['MAX_STEPS']} on this server")
    if training["seq_len"] > int(cfg["MAX_SEQ_LEN"]):
        _invalid("training.seq_len", f"must be at most {cfg['MAX_SEQ_LEN']} on this server")
    devices = (spec.get("resources") or {}).get("devices", 1)
    if devices > int(cfg["MAX_DEVICES"]):
        _invalid("resources.devices", f"must be at most {cfg['MAX_DEVICES']} on this server (the devices "
                                      "of one training worker)")
    params = estimate_params(spec["model"], training["seq_len"], vocab_estimate(spec.get("tokenizer") or {}))
    if params > int(cfg["MAX_PARAMS"]):
        _invalid("model", f"has about {params:,} parameters; this server allows {int(cfg['MAX_PARAMS']):,}")


def check_dataset(owner_id: str, spec: dict[str, Any]) -> Dataset:
    """The dataset exists, is the key's, and is long enough for seq_len (same rule as the engine)."""
    if not is_server_id(spec["dataset_id"], "ds"):
        _invalid("dataset_id", "is not a dataset id this server made (ds_ and 24 hex digits)")
    dataset = db.session.get(Dataset, spec["dataset_id"])
    if dataset is None or dataset.owner_id != owner_id:
        _invalid("dataset_id", f"dataset {spec['dataset_id']} not found")
    seq_len, val_fraction = spec["training"]["seq_len"], spec["training"]["val_fraction"]
    # bytes bound the token count from above; train and validation parts each need seq_len + 1 tokens
    n_val = int(dataset.bytes * val_fraction)
    n_train = dataset.bytes - n_val
    if min(n_train, n_val) < seq_len + 1:
        need = int((seq_len + 1) / val_fraction) + 1
        _invalid("dataset_id", f"dataset has {dataset.bytes} bytes; training.seq_len {seq_len} with "
                               f"val_fraction {val_fraction} needs at least about {need}")
    return dataset


def _check_live_jobs(owner_id: str) -> None:
    limit = int(current_app.config["MAX_LIVE_JOBS"])
    live = db.session.execute(
        select(func.count()).select_from(Job).where(Job.owner_id == owner_id, Job.status.in_(LIVE_STATUSES))
    ).scalar_one()
    if live >= limit:
        abort(429, message=f"This key already has {live} queued or running jobs (limit {limit}); "
                           "wait for one to finish or cancel one.",
              headers={"Retry-After": "30"}, details={"live_jobs": live, "limit": limit})


def find_idempotent(owner_id: str, key: str | None, body_hash: str | None = None) -> Job | None:
    """The job an earlier request with this Idempotency-Key created, if any; 422 `idempotency_mismatch`
    when that request's body was different (jobs stored before body hashes were kept match any body)."""
    if not key:
        return None
    job = db.session.execute(
        select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key)
    ).scalar_one_or_none()
    if job is not None and body_hash and job.idempotency_hash and job.idempotency_hash != body_hash:
        abort(422, code="idempotency_mismatch",
              message="This Idempotency-Key was already used with a different request body; "
                      "send a new key for a new job.",
              details={"Idempotency-Key": ["Used before with a different body."], "job_id": job.id})
    return job


def submit_job(owner_id: str, spec: dict[str, Any], idempotency_key: str | None, body_hash: str | None = None,
               parent_id: str | None = None, applied_patch: list[dict[str, Any]] | None = None) -> tuple[Job, bool]:
    """Validate limits, record the job, commit, then enqueue; returns (job, created).
    A retry (app.services.retry) passes its parent's id and the spec changes it applied."""
    existing = find_idempotent(owner_id, idempotency_key, body_hash)
    if existing is not None:
        return existing, False
    check_limits(spec)
    lock_owner(owner_id)  # held until the commit below: concurrent submits (or a delete) cannot interleave
    check_dataset(owner_id, spec)  # under the lock: the dataset cannot be deleted before the job commits
    _check_live_jobs(owner_id)
    # enqueued_at is stamped with the record, before the publish: a reconciler pass that runs
    # between this commit and the publish must not send the job a second time
    job = Job(id=new_id("job"), owner_id=owner_id, dataset_id=spec["dataset_id"], name=spec["name"], spec=spec_to_json(spec),
              status="queued", max_steps=spec["training"]["max_steps"], idempotency_key=idempotency_key,
              idempotency_hash=body_hash if idempotency_key else None, enqueued_at=utcnow(),
              parent_id=parent_id, applied_patch=applied_patch)
    db.session.add(job)
    try:
        db.session.flush()
        record_job_event(db.session, job.id)  # job.queued, committed with the job (the webhook outbox)
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        existing = find_idempotent(owner_id, idempotency_key, body_hash)
        if existing is None:
            raise
        return existing, False
    enqueue_job(job)
    return job, True


def enqueue_job(job: Job) -> None:
    """Publish the train task for a committed job; on failure clear enqueued_at so the reconciler re-sends it."""
    if not publish(TRAIN_TASK, job.id, TRAIN_QUEUE):
        db.session.execute(update(Job).where(Job.id == job.id, Job.status == "queued")
                           .values(enqueued_at=None, updated_at=Job.updated_at))
        db.session.commit()
        db.session.refresh(job)


def get_job(owner_id: str, job_id: str) -> Job:
    """The key's job or 404."""
    return get_owned(Job, job_id, owner_id, "Job")


def list_jobs(owner_id: str, status: str | None, limit: int, cursor: str | None) -> tuple[list[Job], str | None]:
    """One page of the key's jobs, newest first, optionally of one status."""
    stmt = select(Job).where(Job.owner_id == owner_id)
    if status:
        stmt = stmt.where(Job.status == status)
    return newest_first_page(stmt, Job, limit, cursor)


def cancel_job(owner_id: str, job_id: str) -> Job:
    """queued or paused -> cancelled now; running or pausing -> cancelling (worker stops next step);
    terminal -> 409."""
    job = get_job(owner_id, job_id)
    was = job.status
    now = utcnow()
    done = db.session.execute(
        update(Job).where(Job.id == job.id, Job.status.in_(("queued", "paused")))
        .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
    ).rowcount
    if done:
        message = "cancelled while paused" if was == "paused" else "cancelled before it started"
        db.session.add(Event(job_id=job.id, step=job.step, kind="cancelled", message=message))
        record_job_event(db.session, job.id, "job.cancelled")
    else:
        db.session.execute(
            update(Job).where(Job.id == job.id, Job.status.in_(("running", "pausing", "cancelling")))
            .values(status="cancelling", cancel_requested=True, updated_at=now)
        )
    db.session.commit()
    db.session.refresh(job)
    if not done and job.status in TERMINAL_STATUSES:
        abort(409, message=f"Job {job.id} is already {job.status}.", details={"status": job.status})
    return job


def pause_job(owner_id: str, job_id: str) -> Job:
    """queued -> paused now; running -> pausing (the worker checkpoints at its next step, hands the job
    back and it becomes paused); pausing or paused: unchanged; cancelling or finished -> 409."""
    job = get_job(owner_id, job_id)
    now = utcnow()
    paused_now = db.session.execute(
        update(Job).where(Job.id == job.id, Job.status == "queued")
        .values(status="paused", paused_at=now, updated_at=now)
    ).rowcount
    if paused_now:
        message = ("paused before it started" if job.started_at is None
                   else "paused while queued; it resumes from its newest checkpoint")
        db.session.add(Event(job_id=job.id, step=job.step, kind="paused", message=message))
        record_job_event(db.session, job.id, "job.paused")
    else:
        db.session.execute(update(Job).where(Job.id == job.id, Job.status == "running")
                           .values(status="pausing", updated_at=now))
    db.session.commit()
    db.session.refresh(job)
    if job.status not in ("paused", "pausing"):
        abort(409, message=f"Job {job.id} is {job.status}; only queued or running jobs can be paused.",
              details={"status": job.status})
    return job


def resume_job(owner_id: str, job_id: str) -> tuple[Job, bool]:
    """paused -> queued (under the per-key live-job limit), sent through the outbox like a new job; the
    worker resumes from the newest valid checkpoint. Returns (job, requeued): a queued or running job is
    left as it is (a repeated resume); pausing, cancelling or finished -> 409."""
    job = get_job(owner_id, job_id)
    lock_owner(owner_id)  # the live-job count and the requeue commit together
    db.session.refresh(job)
    if job.status in ("queued", "running"):
        db.session.rollback()
        return job, False
    if job.status != "paused":
        hint = ("it is still pausing: resume it once it is paused" if job.status == "pausing"
                else "only paused jobs can be resumed")
        db.session.rollback()
        abort(409, message=f"Job {job.id} is {job.status}; {hint}.", details={"status": job.status})
    _check_live_jobs(owner_id)
    now = utcnow()
    # only time paused after the first start is subtracted from the job time limit (which starts there)
    paused_for = (now - job.paused_at).total_seconds() if job.started_at and job.paused_at else 0.0
    db.session.execute(
        update(Job).where(Job.id == job.id, Job.status == "paused")
        .values(status="queued", paused_at=None, paused_s=Job.paused_s + max(0.0, paused_for), enqueued_at=now,
                updated_at=now)
    )
    db.session.add(Event(job_id=job.id, step=job.step, kind="requeued",
                         message="resumed; the job continues from its newest checkpoint"))
    record_job_event(db.session, job.id, "job.queued")
    db.session.commit()
    db.session.refresh(job)
    enqueue_job(job)
    return job, True


def latest_row(job: Job) -> dict[str, Any] | None:
    """The job's last step row: the worker's `latest` copy, else the newest StepMetric."""
    if job.latest:
        return clean_row(job.latest)
    cols = [getattr(StepMetric, c) for c in STEP_COLUMNS]
    row = db.session.execute(
        select(*cols).where(StepMetric.job_id == job.id).order_by(StepMetric.step.desc()).limit(1)
    ).first()
    return clean_row(dict(zip(STEP_COLUMNS, row, strict=True))) if row else None


def progress(job: Job) -> dict[str, Any]:
    """step, max_steps, fraction, tokens_seen and an ETA from the observed step rate."""
    fraction = min(1.0, job.step / job.max_steps) if job.max_steps else 0.0
    eta: float | None = None
    if job.status in ("running", "pausing", "cancelling") and job.started_at and job.step > 0:
        elapsed = (utcnow() - job.started_at).total_seconds() - (job.paused_s or 0.0)
        if elapsed > 0:
            eta = round(max(0, job.max_steps - job.step) * elapsed / job.step, 1)
    if job.status == "succeeded":
        eta = 0.0
    return {"step": job.step, "max_steps": job.max_steps, "fraction": round(fraction, 6),
            "tokens_seen": job.tokens_seen, "eta_s": eta}


def child_ids(job: Job) -> list[str]:
    """Ids of the jobs retried from this one, oldest first."""
    return list(db.session.execute(
        select(Job.id).where(Job.parent_id == job.id).order_by(Job.created_at, Job.id)
    ).scalars())


def job_view(job: Job, with_latest: bool = True) -> dict[str, Any]:
    """The public shape of a job; with_latest=False is the list shape (no queries: no latest row
    beyond the stored copy, no children)."""
    view = {
        "id": job.id, "name": job.name, "status": job.status, "dataset_id": job.dataset_id, "spec": job.spec,
        "created_at": job.created_at, "updated_at": job.updated_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "enqueued_at": job.enqueued_at, "progress": progress(job),
        "latest": latest_row(job) if with_latest else clean_row(job.latest), "health": job.health,
        "error": job.error, "attempts": job.attempts, "cancel_requested": job.cancel_requested,
        "paused_at": job.paused_at,
        "parent_id": job.parent_id, "applied_patch": job.applied_patch,
    }
    if with_latest:
        view["children"] = child_ids(job)
    return view
