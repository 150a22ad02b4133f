"""Fault 1: a worker is SIGKILLed mid-job; the other worker finishes it from the newest checkpoint.

The job must end `succeeded` with metric rows 1..max_steps exactly once and the
same final parameters (torch.equal) and per-step losses as an uninterrupted run
of the same spec with the engine's Trainer in this process (dropout on, so the
RNG state restored from the checkpoint matters).
"""

from __future__ import annotations

import io
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.reliability.conftest import Cluster
from tests.reliability.helpers import (
    assert_checkpoints_served,
    assert_steps_once,
    checkpoints,
    download,
    events,
    get_job,
    job_spec,
    submit,
    upload,
    wait_status,
)
from worker.engine.config import parse_spec
from worker.engine.trainer import Callbacks, Trainer
from worker.testing import wait_for

pytestmark = pytest.mark.integration

MAX_STEPS, EVERY = 600, 100


class Rows(Callbacks):
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_metrics(self, rows: list[dict[str, Any]]) -> None:
        self.rows += rows


def uninterrupted_run(spec: dict[str, Any], text: str, out_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The same spec straight through in this process, on one CPU thread like the workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = Rows()
        result = Trainer(parse_spec(spec), text, out_dir, rows, device="cpu").run()
        assert result.status == "succeeded", result.error
        state = torch.load(out_dir / f"step_{MAX_STEPS}.pt", weights_only=True)
        return state["model"], rows.rows
    finally:
        torch.set_num_threads(threads)


def test_sigkill_mid_job_other_worker_finishes_bit_identical(any_cluster: Cluster, corpus: bytes,
                                                               tmp_path: Path) -> None:
    cluster = any_cluster
    cluster.start_workers("a", "b", LEASE_S=3)  # a killed worker's job is requeued within ~4 s
    job_id = submit(cluster, upload(cluster, corpus),
                    spec=job_spec(MAX_STEPS, EVERY, keep_last=2, dropout=0.2, seed=11))

    # kill the worker that has it once it is past its first checkpoint (steps to redo after the resume)
    def past_first_checkpoint() -> bool:
        listed = checkpoints(cluster, job_id)
        return bool(listed) and get_job(cluster, job_id)["progress"]["step"] > listed[0]["step"]

    wait_for(past_first_checkpoint, 120, "the job to pass its first checkpoint", every_s=0.02)
    victim = cluster.job_row(job_id).worker_id
    cluster.kill_worker(victim, signal.SIGKILL)
    survivor = ({"a", "b"} - {victim}).pop()
    at_kill = get_job(cluster, job_id)
    assert at_kill["status"] == "running" and at_kill["progress"]["step"] < MAX_STEPS, at_kill
    newest = max(c["step"] for c in checkpoints(cluster, job_id))

    # meanwhile: the uninterrupted reference run, same spec and same stored text as the worker reads
    text = next((cluster.root / "storage" / "datasets").glob("*.txt")).read_text(encoding="utf-8")
    ref_model, ref_rows = uninterrupted_run(at_kill["spec"], text, tmp_path / "reference")

    job = wait_status(cluster, job_id, {"succeeded"}, 120)
    row = cluster.job_row(job_id)
    assert (row.worker_id, row.attempts) == (survivor, 2)
    rows = assert_steps_once(cluster, job_id, MAX_STEPS)
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert job["progress"]["step"] == MAX_STEPS

    kinds = [e["kind"] for e in events(cluster, job_id)]
    assert kinds.count("started") == 1 and kinds.count("requeued") == 1 and kinds.count("resumed") == 1
    resumed = next(e for e in events(cluster, job_id) if e["kind"] == "resumed")
    assert re.search(rf"resumed at step {newest}\b", resumed["message"]), (newest, resumed)

    listed = assert_checkpoints_served(cluster, job_id)
    assert listed[-1]["step"] == MAX_STEPS
    status, data = download(cluster, job_id, MAX_STEPS)
    assert status == 200
    model = torch.load(io.BytesIO(data), weights_only=True)["model"]
    assert model.keys() == ref_model.keys()
    different = [name for name in model if not torch.equal(model[name], ref_model[name])]
    assert not different, f"parameters differ from the uninterrupted run: {different}"
