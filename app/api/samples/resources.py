"""/v1/jobs/{id}/samples."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from app.api.samples.schemas import SampleRequestSchema, SampleSchema, SampleWaitSchema
from app.api.utils import json_body
from app.auth import current_owner_id
from app.models import Sample
from app.services import jobs as jobs_service
from app.services import samples as service

blp = Blueprint("samples", __name__, url_prefix="/v1/jobs", description="Text samples")


@blp.route("/<string:job_id>/samples")
class Samples(MethodView):
    @json_body
    @blp.arguments(SampleWaitSchema, location="query")
    @blp.arguments(SampleRequestSchema)
    @blp.response(202, SampleSchema, description="Queued (or running): poll GET .../samples/{sample_id}")
    @blp.alt_response(201, schema=SampleSchema, description="Done (succeeded or failed) within `wait` seconds")
    @blp.alt_response(409, response="CONFLICT", description="The job has no checkpoint yet")
    def post(self, query: dict[str, Any], args: dict[str, Any], job_id: str) -> Any:
        """Queue a text sample from a checkpoint: 202 at once with its id, then poll it.

        With `wait` (0 to 10 s) the answer is 201 with the text when the worker finishes within it,
        else 202; waiting is best effort (a server already holding its share of waiting requests
        answers 202 at once). A key may have MAX_QUEUED_SAMPLES (default 8) queued or running samples;
        past that, 429 with Retry-After. Samples of different keys run round-robin."""
        owner = current_owner_id()
        job = jobs_service.get_job(owner, job_id)
        sample = service.wait_for(service.create_sample(owner, job, args), query["wait"])
        return sample, (201 if sample.status in service.DONE else 202)


@blp.route("/<string:job_id>/samples/<string:sample_id>")
class SampleById(MethodView):
    @blp.response(200, SampleSchema)
    def get(self, job_id: str, sample_id: str) -> Sample:
        """Read one sample (status, text, error)."""
        owner = current_owner_id()
        return service.get_sample(owner, jobs_service.get_job(owner, job_id), sample_id)
