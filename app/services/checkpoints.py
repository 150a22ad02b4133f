"""Checkpoint listing and stored-file lookup."""

from __future__ import annotations

from flask_smorest import abort
from sqlalchemy import select

from app.extensions import db
from app.models import Checkpoint, Job
from app.schemas.fields import DB_INT_MAX
from app.services.storage import checkpoint_key, storage
from stabletrain_storage import ObjectInfo


def list_checkpoints(job: Job) -> list[Checkpoint]:
    """The job's checkpoints, oldest step first."""
    return list(db.session.execute(
        select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step)
    ).scalars())


def get_checkpoint(job: Job, step: int) -> Checkpoint:
    """One checkpoint record or 404 (a step no database integer can hold is absent without a query)."""
    ckpt = db.session.get(Checkpoint, (job.id, step)) if 0 <= step <= DB_INT_MAX else None
    if ckpt is None:
        abort(404, message=f"Job {job.id} has no checkpoint at step {step}.")
    return ckpt


def newest_checkpoint(job: Job) -> Checkpoint | None:
    """The checkpoint with the highest step, if any."""
    return db.session.execute(
        select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step.desc()).limit(1)
    ).scalar_one_or_none()


def checkpoint_file(ckpt: Checkpoint) -> tuple[str, ObjectInfo]:
    """Key and size of a stored checkpoint, the key built from server-made ids only; 404 when pruned."""
    key = checkpoint_key(ckpt.job_id, ckpt.step)
    info = storage().stat(key)
    if info is None:
        gone(ckpt)
        raise AssertionError  # unreachable: gone() aborts
    return key, info


def gone(ckpt: Checkpoint) -> None:
    """404: the record exists but its file was pruned or deleted."""
    abort(404, message=f"Checkpoint file for step {ckpt.step} is no longer stored.",
          details={"job_id": ckpt.job_id, "step": ckpt.step})
