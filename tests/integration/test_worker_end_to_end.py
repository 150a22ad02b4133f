"""End to end through the API, a real broker and a real `celery worker` process."""

from __future__ import annotations

import hashlib
import io
import signal
import time
from typing import Any

import pytest
import torch

from tests.integration.conftest import Stack
from worker.testing import wait_for

pytestmark = pytest.mark.integration

TERMINAL = {"succeeded", "failed", "cancelled"}

TINY_JOB: dict[str, Any] = {
    "name": "tiny-lstm",
    "model": {"arch": "lstm", "n_layers": 1, "d_model": 32, "hidden": 32},
    "training": {"max_steps": 30, "batch_size": 8, "seq_len": 32, "eval_every": 10},
    "monitoring": {"layer_stats_every": 5},
    "checkpointing": {"every_steps": 10, "keep_last": 3},
}


def upload(stack: Stack, corpus: bytes) -> str:
    resp = stack.api("POST", "/v1/datasets", data={"file": (io.BytesIO(corpus), "corpus.txt")},
                     content_type="multipart/form-data")
    assert resp.status_code in (200, 201), resp.get_json()
    return resp.get_json()["id"]


def submit(stack: Stack, dataset_id: str, spec: dict[str, Any] | None = None, **training: Any) -> str:
    spec = spec or TINY_JOB
    body = {**spec, "dataset_id": dataset_id, "training": {**spec["training"], **training}}
    resp = stack.api("POST", "/v1/jobs", json=body)
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def get_job(stack: Stack, job_id: str) -> dict[str, Any]:
    resp = stack.api("GET", f"/v1/jobs/{job_id}")
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def wait_status(stack: Stack, job_id: str, statuses: set[str], timeout_s: float) -> dict[str, Any]:
    """Poll the job until its status is one of `statuses` (fail fast on an unexpected final state)."""
    def check() -> dict[str, Any] | None:
        job = get_job(stack, job_id)
        if job["status"] in TERMINAL and job["status"] not in statuses:
            pytest.fail(f"job ended {job['status']}: {job['error']}\n{stack.log_tail()}")
        return job if job["status"] in statuses else None

    return wait_for(check, timeout_s, f"job {job_id} to be {statuses}", every_s=0.1)


def paged(stack: Stack, path: str, limit: int) -> list[dict[str, Any]]:
    """Every item of a cursor-paged endpoint, following next_cursor."""
    items: list[dict[str, Any]] = []
    page = stack.api("GET", f"{path}?limit={limit}").get_json()
    while True:
        items += page["items"]
        if page["next_cursor"] is None:
            return items
        page = stack.api("GET", f"{path}?limit={limit}&cursor={page['next_cursor']}").get_json()


def checkpoints(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    return stack.api("GET", f"/v1/jobs/{job_id}/checkpoints").get_json()["items"]


def test_tiny_job_trains_and_everything_reads_back(stack: Stack, corpus: bytes) -> None:
    job_id = submit(stack, upload(stack, corpus))
    job = wait_status(stack, job_id, {"succeeded"}, 240)
    assert job["progress"]["step"] == 30 and job["error"] is None
    # the worker trained from the corpus tokenized once into the token cache (byte ids as uint16)
    sha = hashlib.sha256(corpus).hexdigest()
    storage = stack.root / "storage"
    cached = sorted((storage / "tokens").glob(f"{sha}-byte-*.u16"))
    text = (storage / "datasets" / f"{sha}.txt").read_text(encoding="utf-8")
    assert len(cached) == 1 and cached[0].stat().st_size == 2 * len(text.encode("utf-8"))

    steps = paged(stack, f"/v1/jobs/{job_id}/metrics", limit=7)
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert [r["step"] for r in steps if r["val_loss"] is not None] == [10, 20, 30]

    layers = paged(stack, f"/v1/jobs/{job_id}/metrics/layers", limit=1000)
    assert {r["step"] for r in layers} == {5, 10, 15, 20, 25, 30}

    diagnosis = stack.api("GET", f"/v1/jobs/{job_id}/diagnosis").get_json()
    assert isinstance(diagnosis["findings"], list) and diagnosis["summary"]

    events = stack.api("GET", f"/v1/jobs/{job_id}/events").get_json()["items"]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished" and "checkpoint" in kinds

    ckpts = checkpoints(stack, job_id)
    assert [c["step"] for c in ckpts] == [10, 20, 30]
    last = ckpts[-1]
    resp = stack.api("GET", f"/v1/jobs/{job_id}/checkpoints/30/file")
    data = resp.data
    resp.close()  # the file is streamed; close it like a WSGI server would
    assert resp.status_code == 200
    assert hashlib.sha256(data).hexdigest() == last["sha256"] and len(data) == last["bytes"]
    state = torch.load(io.BytesIO(data), weights_only=True)
    assert state["step"] == 30 and state["format"] == "stabletrain-ckpt-v1"

    resp = stack.api("POST", f"/v1/jobs/{job_id}/samples", json={"prompt": "The ", "max_new_tokens": 20, "step": 30})
    assert resp.status_code == 202 and resp.get_json()["status"] == "queued", resp.get_json()
    url = f"/v1/jobs/{job_id}/samples/{resp.get_json()['id']}"
    sample = wait_for(lambda: (s := stack.api("GET", url).get_json())["status"] in ("succeeded", "failed") and s,
                      60, "the sample worker's text")
    assert sample["status"] == "succeeded" and isinstance(sample["text"], str) and sample["text"]


def test_cancel_queued_and_running_jobs(stack: Stack, corpus: bytes) -> None:
    dataset_id = upload(stack, corpus)
    running_id = submit(stack, dataset_id, max_steps=1_000_000)
    wait_for(lambda: get_job(stack, running_id)["progress"]["step"] > 0, 120, "the long job to report steps")

    # the only worker is busy, so this one stays queued and is cancelled at once
    queued_id = submit(stack, dataset_id)
    resp = stack.api("POST", f"/v1/jobs/{queued_id}/cancel")
    assert resp.status_code in (200, 202), resp.get_json()
    assert get_job(stack, queued_id)["status"] == "cancelled"

    asked = time.monotonic()
    resp = stack.api("POST", f"/v1/jobs/{running_id}/cancel")
    assert resp.status_code in (200, 202), resp.get_json()
    job = wait_status(stack, running_id, {"cancelled"}, 30)
    took = time.monotonic() - asked
    assert took < 10, f"cancel took {took:.1f} s"
    assert checkpoints(stack, running_id)[-1]["step"] == job["progress"]["step"], "final checkpoint at the stop"

    # its message is still delivered once the worker is free: the claim drops it
    wait_for(lambda: f"job {queued_id} not claimable" in stack.log_tail(200_000), 60,
             "the worker to drop the cancelled job's message")
    job = get_job(stack, queued_id)
    assert (job["status"], job["attempts"], job["started_at"]) == ("cancelled", 0, None)


def test_diverging_spec_fails_with_its_reason(stack: Stack, corpus: bytes) -> None:
    spec = {"name": "exploding-rnn",
            "model": {"arch": "rnn", "activation": "relu", "d_model": 32, "hidden": 64, "init": "normal",
                      "init_std": 0.1},
            "training": {"max_steps": 60, "batch_size": 8, "seq_len": 32, "lr": 1.0, "optimizer": "sgd"},
            "stabilization": {"clip": {"mode": "none"}, "nonfinite": "stop"}}
    job_id = submit(stack, upload(stack, corpus), spec=spec)
    job = wait_status(stack, job_id, {"failed"}, 240)
    assert "non-finite" in job["error"]
    kinds = {f["kind"] for f in stack.api("GET", f"/v1/jobs/{job_id}/diagnosis").get_json()["findings"]}
    assert "nonfinite" in kinds


def test_killed_worker_job_is_requeued_and_resumed(stack: Stack, corpus: bytes) -> None:
    """SIGKILL mid-run: the lease expires, the next worker's reconciler requeues it, the run resumes."""
    job_id = submit(stack, upload(stack, corpus), max_steps=1500,
                    spec={**TINY_JOB, "checkpointing": {"every_steps": 20, "keep_last": 2}})
    wait_for(lambda: checkpoints(stack, job_id), 120, "a first checkpoint")
    stack.stop_worker(signal.SIGKILL)
    killed_at = get_job(stack, job_id)
    assert killed_at["status"] == "running"

    stack.start_worker()
    job = wait_status(stack, job_id, {"succeeded"}, 240)
    assert job["attempts"] == 2
    steps = paged(stack, f"/v1/jobs/{job_id}/metrics", limit=5000)
    assert [r["step"] for r in steps] == list(range(1, 1501))
    kinds = [e["kind"] for e in stack.api("GET", f"/v1/jobs/{job_id}/events?limit=1000").get_json()["items"]]
    assert "requeued" in kinds and "resumed" in kinds


def test_warm_shutdown_hands_the_job_back(stack: Stack, corpus: bytes) -> None:
    """SIGTERM (Celery warm shutdown): the job checkpoints at its next step, goes back to queued, resumes later."""
    job_id = submit(stack, upload(stack, corpus), max_steps=1_000_000)
    wait_for(lambda: get_job(stack, job_id)["progress"]["step"] > 0, 120, "the job to report steps")
    asked = time.monotonic()
    stack.stop_worker(signal.SIGTERM, timeout_s=60)
    took = time.monotonic() - asked
    job = get_job(stack, job_id)
    assert job["status"] == "queued" and took < 30, (job["status"], took)
    assert checkpoints(stack, job_id)[-1]["step"] == job["progress"]["step"]
    stack.start_worker()
    wait_status(stack, job_id, {"running"}, 60)
    stack.api("POST", f"/v1/jobs/{job_id}/cancel")
    job = wait_status(stack, job_id, {"cancelled"}, 60)
    kinds = [e["kind"] for e in stack.api("GET", f"/v1/jobs/{job_id}/events?limit=1000").get_json()["items"]]
    assert "requeued" in kinds and "resumed" in kinds and job["attempts"] == 1  # a hand-back is no attempt
