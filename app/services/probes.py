"""LR range tests (probes) of a job's spec, run by a samples worker and polled like samples.

A probe uses the job's stored spec and dataset, whatever the job's state (queued, running or
finished): it trains a throwaway copy of the model and writes only its own record, never the job's
metrics, checkpoints or state. The job's dataset must still exist (409 otherwise)."""

from __future__ import annotations

from typing import Any

from flask import current_app
from flask_smorest import abort
from sqlalchemy import delete, func, select

from app.extensions import db
from app.models import PENDING_PROBE_STATUSES, Dataset, Job, Probe, utcnow
from app.services.common import get_owned_of_job, lock_owner
from app.services.queue import PROBE_TASK, SAMPLE_QUEUE, publish


def _check_pending_probes(owner_id: str) -> None:
    limit = int(current_app.config["MAX_QUEUED_PROBES"])
    pending = db.session.execute(select(func.count()).select_from(Probe).where(
        Probe.owner_id == owner_id, Probe.status.in_(PENDING_PROBE_STATUSES))).scalar_one()
    if pending >= limit:
        abort(429, message=f"This key already has {pending} queued or running probes (limit {limit}); "
                           "poll them and ask again when one is done.",
              headers={"Retry-After": "10"}, details={"pending_probes": pending, "limit": limit})


def create_probe(owner_id: str, job: Job, params: dict[str, Any]) -> Probe:
    """Record a queued probe of the job, commit, then send it; 503 (and no record) when the broker refuses."""
    lock_owner(owner_id)  # until the commit: the cap and the dataset check hold together
    if job.dataset_id is None or db.session.get(Dataset, job.dataset_id) is None:
        abort(409, message=f"Job {job.id}'s dataset was deleted; a probe needs it.")
    _check_pending_probes(owner_id)
    probe = Probe(job_id=job.id, owner_id=owner_id, params=params, status="queued", enqueued_at=utcnow())
    db.session.add(probe)
    db.session.commit()
    if not publish(PROBE_TASK, probe.id, SAMPLE_QUEUE):
        # a probe is cheap to ask for again; one that could not be sent is not kept as accepted work
        db.session.execute(delete(Probe).where(Probe.id == probe.id))
        db.session.commit()
        abort(503, message="The task queue is unavailable; ask for the probe again shortly.")
    return probe


def get_probe(owner_id: str, job: Job, probe_id: str) -> Probe:
    """The key's probe of this job or 404."""
    return get_owned_of_job(Probe, probe_id, owner_id, job.id, "Probe")
