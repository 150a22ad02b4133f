"""Pause and resume end to end: the API, a real broker and a real `celery worker` process.

A running job is paused (it checkpoints and frees the only worker, which then trains another job to
the end), resumed, and finishes with the same weights as an uninterrupted run of the same spec."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from tests.integration.conftest import Stack
from tests.integration.test_worker_end_to_end import (
    TINY_JOB,
    checkpoints,
    get_job,
    submit,
    upload,
    wait_status,
)
from worker.testing import wait_for

pytestmark = pytest.mark.integration

MAX_STEPS = 1500
# long enough that the pause surely lands mid-run (the heartbeat sees it within half a second),
# few checkpoints and stats so the two runs stay quick
PAUSABLE_JOB: dict[str, Any] = {
    **TINY_JOB, "name": "pausable",
    "training": {**TINY_JOB["training"], "max_steps": MAX_STEPS, "eval_every": 500},
    "monitoring": {"layer_stats_every": 50},
    "checkpointing": {"every_steps": 500, "keep_last": 2},
}


def final_model(stack: Stack, job_id: str) -> dict[str, torch.Tensor]:
    resp = stack.api("GET", f"/v1/jobs/{job_id}/checkpoints/{MAX_STEPS}/file")
    data = resp.data
    resp.close()
    assert resp.status_code == 200
    return torch.load(io.BytesIO(data), weights_only=True)["model"]


def test_pause_frees_the_worker_and_resume_finishes_with_the_uninterrupted_weights(stack: Stack,
                                                                                   corpus: bytes) -> None:
    dataset_id = upload(stack, corpus)
    paused_id = submit(stack, dataset_id, PAUSABLE_JOB)
    wait_for(lambda: get_job(stack, paused_id)["progress"]["step"] > 0, 120, "the job to report steps")
    resp = stack.api("POST", f"/v1/jobs/{paused_id}/pause")
    assert resp.status_code == 202 and resp.get_json()["status"] == "pausing", resp.get_json()
    job = wait_status(stack, paused_id, {"paused"}, 60)
    step = job["progress"]["step"]
    assert 0 < step < MAX_STEPS, "the pause must land mid-run for this test to mean anything"
    assert job["attempts"] == 0 and job["finished_at"] is None  # a pause is no crash attempt
    assert checkpoints(stack, paused_id)[-1]["step"] == step
    kinds = [e["kind"] for e in stack.api("GET", f"/v1/jobs/{paused_id}/events?limit=1000").get_json()["items"]]
    assert kinds[-1] == "paused"

    # the only worker is free: an identical job, submitted now, trains to the end while the first waits
    straight_id = submit(stack, dataset_id, PAUSABLE_JOB)
    wait_status(stack, straight_id, {"succeeded"}, 240)
    assert get_job(stack, paused_id)["status"] == "paused"

    resp = stack.api("POST", f"/v1/jobs/{paused_id}/resume")
    assert resp.status_code == 202 and resp.get_json()["status"] == "queued", resp.get_json()
    job = wait_status(stack, paused_id, {"succeeded"}, 240)
    assert job["progress"]["step"] == MAX_STEPS and job["attempts"] == 1
    resumed = [e for e in stack.api("GET", f"/v1/jobs/{paused_id}/events?limit=1000").get_json()["items"]
               if e["kind"] == "resumed"]
    assert [e["step"] for e in resumed] == [step]  # continued from the pause checkpoint, not from scratch
    a, b = final_model(stack, straight_id), final_model(stack, paused_id)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
