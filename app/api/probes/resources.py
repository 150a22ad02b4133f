"""/v1/jobs/{id}/probes: LR range tests of a job's spec."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from app.api.probes.schemas import ProbeRequestSchema, ProbeSchema
from app.api.utils import job_found_first, json_body
from app.auth import current_owner_id
from app.models import Probe
from app.services import jobs as jobs_service
from app.services import probes as service

blp = Blueprint("probes", __name__, url_prefix="/v1/jobs", description="LR range tests")


@blp.route("/<string:job_id>/probes")
class Probes(MethodView):
    @job_found_first
    @json_body
    @blp.arguments(ProbeRequestSchema)
    @blp.response(202, ProbeSchema, description="Queued: poll GET .../probes/{probe_id}")
    @blp.alt_response(409, response="CONFLICT", description="The job's dataset was deleted")
    def post(self, args: dict[str, Any], job_id: str) -> Probe:
        """Queue an LR range test (Smith 2017) of the job's spec and dataset, in any job state.

        A worker trains a throwaway copy of the model with the lr growing geometrically from lr_min to
        lr_max and records the loss curve, the steepest-descent and divergence lrs and a recommended
        `training.lr` for POST .../retry `overrides`. The job's own metrics, checkpoints and state are
        untouched. A key may have MAX_QUEUED_PROBES (default 2) queued or running; past that, 429."""
        owner = current_owner_id()
        return service.create_probe(owner, jobs_service.get_job(owner, job_id), args)


@blp.route("/<string:job_id>/probes/<string:probe_id>")
class ProbeById(MethodView):
    @blp.response(200, ProbeSchema)
    def get(self, job_id: str, probe_id: str) -> Probe:
        """Read one probe (status, result, error)."""
        owner = current_owner_id()
        return service.get_probe(owner, jobs_service.get_job(owner, job_id), probe_id)
