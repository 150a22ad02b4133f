"""Dry run calibration and LR probes through the API, a real broker and a real `celery worker` process."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Stack
from tests.integration.test_worker_end_to_end import TINY_JOB, submit, upload, wait_status
from worker.testing import wait_for

pytestmark = pytest.mark.integration


# clipping off: the sweep must reach divergence within lr_max (a norm clip can keep a small net bounded)
PROBED_JOB: dict[str, Any] = {
    **TINY_JOB, "name": "probed-mlp",
    "model": {"arch": "mlp", "n_layers": 2, "d_model": 16, "hidden": 64, "context": 4},
    "training": {"max_steps": 30, "batch_size": 16, "seq_len": 16, "eval_every": 10},
    "stabilization": {"clip": {"mode": "none"}},
}


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _job_records(stack: Stack, job_id: str) -> tuple[Any, ...]:
    job = stack.api("GET", f"/v1/jobs/{job_id}").get_json()
    steps = stack.api("GET", f"/v1/jobs/{job_id}/metrics?limit=1000").get_json()["items"]
    events = stack.api("GET", f"/v1/jobs/{job_id}/events?limit=1000").get_json()["items"]
    checkpoints = stack.api("GET", f"/v1/jobs/{job_id}/checkpoints").get_json()
    return job, steps, events, checkpoints


def test_probe_of_a_finished_job_leaves_it_untouched(stack: Stack, corpus: bytes) -> None:
    job_id = submit(stack, upload(stack, corpus), PROBED_JOB)
    wait_status(stack, job_id, {"succeeded"}, 180)
    ckpt_dir = Path(stack.config["STORAGE_DIR"]) / "checkpoints" / job_id
    files_before, records_before = _files(ckpt_dir), _job_records(stack, job_id)
    created = stack.api("POST", f"/v1/jobs/{job_id}/probes", json={"lr_min": 1e-5, "lr_max": 10.0, "steps": 120})
    assert created.status_code == 202, created.get_json()
    url = f"/v1/jobs/{job_id}/probes/{created.get_json()['id']}"

    def done() -> dict[str, Any] | None:
        probe = stack.api("GET", url).get_json()
        return probe if probe["status"] in ("succeeded", "failed") else None

    probe = wait_for(done, 180, "the probe to finish", every_s=0.2)
    assert probe["status"] == "succeeded", (probe["error"], stack.log_tail())
    result = probe["result"]
    assert result["divergence_lr"] is not None and result["steepest_lr"] < result["divergence_lr"]
    assert len(result["curve"]) == result["steps_run"] <= 120
    patch = result["recommended"]
    assert patch["field"] == "training.lr" and 0 < patch["value"] <= result["divergence_lr"] / 10 * 1.001
    assert _files(ckpt_dir) == files_before and _job_records(stack, job_id) == records_before
    # the recommendation is usable as a retry override
    retry = stack.api("POST", f"/v1/jobs/{job_id}/retry",
                      json={"apply": [], "overrides": {patch["field"]: patch["value"]}})
    assert retry.status_code == 202, retry.get_json()
    assert retry.get_json()["spec"]["training"]["lr"] == patch["value"]
    stack.api("POST", f"/v1/jobs/{retry.get_json()['id']}/cancel")


def test_dry_run_requests_a_calibration_then_answers_with_it(stack: Stack, corpus: bytes) -> None:
    dataset_id = upload(stack, corpus)
    body = {**TINY_JOB, "dataset_id": dataset_id}

    def estimated() -> dict[str, Any] | None:
        answer = stack.api("POST", "/v1/jobs?dry_run=true", json=body).get_json()
        return answer if answer["estimated_wall_s"] is not None else None

    answer = wait_for(estimated, 180, "a calibrated wall-time estimate", every_s=1.0)
    assert answer["device_class"].startswith("cpu:") and answer["flops_per_s"] > 1e6
    assert answer["estimated_wall_s"] == pytest.approx(answer["flops"] / answer["flops_per_s"])
