"""/v1/jobs: submit, list, read, cancel, pause, resume, retry, diagnosis, events."""

from __future__ import annotations

from typing import Any

from flask import jsonify
from flask.views import MethodView
from flask_smorest import Blueprint

from app.api.jobs.schemas import (
    DiagnosisSchema,
    EventPageSchema,
    EventQuerySchema,
    JobListQuerySchema,
    JobPageSchema,
    JobSchema,
    RetryRequestSchema,
)
from app.api.probes.schemas import DryRunQuerySchema, DryRunSchema
from app.api.utils import idempotency_key, job_found_first, json_body, request_body_hash
from app.auth import current_owner_id
from app.schemas.spec import JobSpecSchema
from app.services import dry_run as dry_run_service
from app.services import events as events_service
from app.services import jobs as service
from app.services import retry as retry_service

blp = Blueprint("jobs", __name__, url_prefix="/v1/jobs", description="Training jobs")
IDEMPOTENCY_KEY = {"in": "header", "name": "Idempotency-Key", "schema": {"type": "string", "maxLength": 255},
                   "description": "Replays with the same key and body answer 200 with the first job"}


def _created_or_replayed(job: Any, created: bool) -> Any:
    """202 with a new job; 200 and Idempotent-Replayed for the job an earlier request made."""
    if created:
        return service.job_view(job)
    return service.job_view(job), 200, {"Idempotent-Replayed": "true"}


@blp.route("")
class Jobs(MethodView):
    @blp.arguments(JobListQuerySchema, location="query")
    @blp.response(200, JobPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List jobs, newest first; filter by status (cursor paged)."""
        jobs, cursor = service.list_jobs(current_owner_id(), args["status"], args["limit"], args["cursor"])
        return {"items": [service.job_view(j, with_latest=False) for j in jobs], "next_cursor": cursor}

    @json_body
    @blp.arguments(DryRunQuerySchema, location="query")
    @blp.arguments(JobSpecSchema)
    @blp.response(202, JobSchema)
    @blp.doc(parameters=[IDEMPOTENCY_KEY], responses={"200": {
        "description": "Idempotent replay: the job an earlier request created (Job); or, with "
                       "`dry_run=true`, the spec's estimate (DryRun)",
        "content": {"application/json": {"schema": {"oneOf": [JobSchema, DryRunSchema]}}}}})
    def post(self, query: dict[str, Any], spec: dict[str, Any]) -> Any:
        """Submit a job spec; 202 with the queued job (honours Idempotency-Key).

        With `?dry_run=true` the spec is validated exactly as a submit would (the same 422s, the dataset
        must exist and be the key's) and the answer is 200 with its parameter count, memory, tokens,
        FLOPs and estimated wall time (docs: "Dry run"); no job is recorded or queued, and an
        Idempotency-Key is ignored.

        A repeat with the same Idempotency-Key and the same JSON body (key order and spacing aside)
        answers 200 with the job the first request made, header `Idempotent-Replayed: true`. The same
        key with a different body answers 422 with code `idempotency_mismatch`; a key over 255
        characters answers 400 (keys are never cut). Keys are per API key."""
        if query["dry_run"]:
            return jsonify(DryRunSchema().dump(dry_run_service.dry_run(current_owner_id(), spec)))
        return _created_or_replayed(*service.submit_job(current_owner_id(), spec, idempotency_key(),
                                                        body_hash=request_body_hash()))


@blp.route("/<string:job_id>")
class JobById(MethodView):
    @blp.response(200, JobSchema)
    def get(self, job_id: str) -> dict[str, Any]:
        """Status, progress, latest metrics, health and error of one job."""
        return service.job_view(service.get_job(current_owner_id(), job_id))


@blp.route("/<string:job_id>/cancel")
class JobCancel(MethodView):
    @blp.response(202, JobSchema)
    @blp.alt_response(200, schema=JobSchema, description="A queued job: cancelled at once")
    @blp.alt_response(409, response="CONFLICT", description="The job has already finished")
    def post(self, job_id: str) -> Any:
        """Cancel: queued jobs at once (200), running ones at the next step (202); 409 when finished."""
        job = service.cancel_job(current_owner_id(), job_id)
        return service.job_view(job), (200 if job.status == "cancelled" else 202)


@blp.route("/<string:job_id>/pause")
class JobPause(MethodView):
    @blp.response(202, JobSchema, description="A running job: `pausing` until its worker has written a checkpoint")
    @blp.alt_response(200, schema=JobSchema, description="A queued job: paused at once (or the job was already paused)")
    @blp.alt_response(409, response="CONFLICT", description="The job is being cancelled or has finished")
    def post(self, job_id: str) -> Any:
        """Pause: a queued job at once (200); a running one checkpoints at its next step, frees its worker
        and becomes `paused` (202, `pausing` meanwhile). Repeating it answers the same. A paused job does
        not count toward the key's live-job limit; resume it with POST /v1/jobs/{id}/resume."""
        job = service.pause_job(current_owner_id(), job_id)
        return service.job_view(job), (200 if job.status == "paused" else 202)


@blp.route("/<string:job_id>/resume")
class JobResume(MethodView):
    @blp.response(202, JobSchema, description="The paused job, queued again: it continues from its newest checkpoint")
    @blp.alt_response(200, schema=JobSchema, description="The job was already queued or running: nothing changed")
    @blp.alt_response(409, response="CONFLICT", description="The job is still pausing, is being cancelled or has finished")
    def post(self, job_id: str) -> Any:
        """Resume a paused job: queued again (under the key's live-job limit), its worker continues from the
        newest valid checkpoint, bit-identically to a run never paused. 429 when the key's live-job limit is reached."""
        job, requeued = service.resume_job(current_owner_id(), job_id)
        return service.job_view(job), (202 if requeued else 200)


@blp.route("/<string:job_id>/retry")
class JobRetry(MethodView):
    @job_found_first
    @json_body
    @blp.arguments(RetryRequestSchema)
    @blp.response(202, JobSchema, description="The new job, queued: parent_id and applied_patch say what changed")
    @blp.alt_response(200, schema=JobSchema, description="Idempotent replay: the job an earlier request created")
    @blp.alt_response(409, response="CONFLICT", description="The job is still queued or running, or has no "
                      "recommendations (of the requested kinds) to apply")
    @blp.doc(parameters=[IDEMPOTENCY_KEY])
    def post(self, args: dict[str, Any], job_id: str) -> Any:
        """Retry a finished job with its diagnosis' recommendations and `overrides` applied to its spec.

        Validated, limited and queued like POST /v1/jobs (422 names the patched spec's failing field)."""
        job, created = retry_service.retry_job(current_owner_id(), job_id, args["apply"], args["overrides"],
                                               idempotency_key(), request_body_hash())
        return _created_or_replayed(job, created)


@blp.route("/<string:job_id>/diagnosis")
class JobDiagnosis(MethodView):
    @blp.response(200, DiagnosisSchema)
    def get(self, job_id: str) -> dict[str, Any]:
        """Gradient-health findings with evidence and recommended fixes."""
        return events_service.diagnosis_view(service.get_job(current_owner_id(), job_id))


@blp.route("/<string:job_id>/events")
class JobEvents(MethodView):
    @blp.arguments(EventQuerySchema, location="query")
    @blp.response(200, EventPageSchema)
    def get(self, args: dict[str, Any], job_id: str) -> dict[str, Any]:
        """Lifecycle and stability events, oldest first (`cursor` paging; `after_id` still starts a listing)."""
        job = service.get_job(current_owner_id(), job_id)
        return events_service.list_events(job, args["after_id"], args["cursor"], args["limit"])
