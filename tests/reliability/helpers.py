"""Job specs and API helpers shared by the fault tests (the API helpers come from the integration tests)."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import torch

from tests.integration.test_worker_end_to_end import checkpoints, get_job, paged, submit, upload, wait_status

__all__ = ["checkpoints", "get_job", "paged", "submit", "upload", "wait_status", "job_spec", "events",
           "download", "assert_steps_once", "assert_checkpoints_served"]


def job_spec(max_steps: int, every_steps: int, keep_last: int = 3, dropout: float = 0.0, seed: int = 0,
             layer_stats_every: int = 10) -> dict[str, Any]:
    """A small LSTM job: a few milliseconds per step on one CPU thread."""
    return {
        "name": "reliability",
        "model": {"arch": "lstm", "n_layers": 1, "d_model": 32, "hidden": 32, "dropout": dropout},
        "training": {"max_steps": max_steps, "batch_size": 8, "seq_len": 32, "eval_every": every_steps,
                     "seed": seed},
        "monitoring": {"layer_stats_every": layer_stats_every},
        "checkpointing": {"every_steps": every_steps, "keep_last": keep_last},
    }


def events(stack: Any, job_id: str) -> list[dict[str, Any]]:
    return stack.api("GET", f"/v1/jobs/{job_id}/events?limit=1000").get_json()["items"]


def download(stack: Any, job_id: str, step: int) -> tuple[int, bytes]:
    resp = stack.api("GET", f"/v1/jobs/{job_id}/checkpoints/{step}/file")
    data = resp.data
    resp.close()
    return resp.status_code, data


def assert_steps_once(stack: Any, job_id: str, max_steps: int) -> list[dict[str, Any]]:
    """Metric rows 1..max_steps, each exactly once (read back through the API's paging)."""
    rows = paged(stack, f"/v1/jobs/{job_id}/metrics", limit=5000)
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, max_steps + 1)), (len(steps), sorted(set(range(1, max_steps + 1)) - set(steps))[:10])
    return rows


def assert_checkpoints_served(stack: Any, job_id: str) -> list[dict[str, Any]]:
    """Every listed checkpoint downloads whole (sha256 and size as listed) and loads safely."""
    listed = checkpoints(stack, job_id)
    for ckpt in listed:
        status, data = download(stack, job_id, ckpt["step"])
        assert status == 200, (ckpt, status)
        assert hashlib.sha256(data).hexdigest() == ckpt["sha256"] and len(data) == ckpt["bytes"], ckpt
        state = torch.load(io.BytesIO(data), weights_only=True)
        assert state["step"] == ckpt["step"]
    return listed
