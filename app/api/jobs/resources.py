"""/v1/jobs: submit, list, read, cancel, diagnosis, events."""

from __future__ import annotations

from typing import Any

from flask import request
from flask.views import MethodView
from flask_smorest import Blueprint

from app.api.jobs.schemas import (
    DiagnosisSchema,
    EventPageSchema,
    EventQuerySchema,
    JobListQuerySchema,
    JobPageSchema,
    JobSchema,
)
from app.api.utils import json_body
from app.auth import current_owner_id
from app.schemas.spec import JobSpecSchema
from app.services import events as events_service
from app.services import jobs as service

blp = Blueprint("jobs", __name__, url_prefix="/v1/jobs", description="Training jobs")


@blp.route("")
class Jobs(MethodView):
    @blp.arguments(JobListQuerySchema, location="query")
    @blp.response(200, JobPageSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List jobs, newest first; filter by status (cursor paged)."""
        jobs, cursor = service.list_jobs(current_owner_id(), args["status"], args["limit"], args["cursor"])
        return {"items": [service.job_view(j, with_latest=False) for j in jobs], "next_cursor": cursor}

    @json_body
    @blp.arguments(JobSpecSchema)
    @blp.response(202, JobSchema)
    @blp.alt_response(200, schema=JobSchema, description="Idempotent replay: the job an earlier request created")
    @blp.doc(parameters=[{"in": "header", "name": "Idempotency-Key", "schema": {"type": "string"}}])
    def post(self, spec: dict[str, Any]) -> Any:
        """Submit a job spec; 202 with the queued job (honours Idempotency-Key)."""
        key = (request.headers.get("Idempotency-Key") or "").strip()[:200] or None
        job, created = service.submit_job(current_owner_id(), spec, key)
        if created:
            return service.job_view(job)
        return service.job_view(job), 200, {"Idempotent-Replayed": "true"}


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
