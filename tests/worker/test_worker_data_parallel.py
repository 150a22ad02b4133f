"""A resources.devices: 2 job through run_train_job: two gloo ranks on CPU, rank 0 reporting, whole-job failure."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import Engine, select

from app.models import Checkpoint, Event, Job, StepMetric
from tests.engine.test_distributed import ranks_alive
from tests.worker.jobfactory import TINY_SPEC, make_job
from worker import service
from worker.engine.distributed import RANK_PROCESS_PREFIX
from worker.reporting import DbReporter
from worker.service import run_train_job
from worker.settings import WorkerSettings

TWO_DEVICES = {**TINY_SPEC, "resources": {"devices": 2}}


def _job(engine: Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        job = conn.execute(select(Job).where(Job.id == job_id)).one()
        steps = list(conn.execute(select(StepMetric.step).where(StepMetric.job_id == job_id)
                                  .order_by(StepMetric.step)).scalars())
        events = list(conn.execute(select(Event.kind).where(Event.job_id == job_id).order_by(Event.id)).scalars())
        ckpts = list(conn.execute(select(Checkpoint.step).where(Checkpoint.job_id == job_id)
                                  .order_by(Checkpoint.step)).scalars())
    return job, steps, events, ckpts


def test_two_device_job_trains_with_one_set_of_records(engine: Engine, settings: WorkerSettings) -> None:
    job_id = make_job(engine, settings.storage_dir, spec=TWO_DEVICES)
    assert run_train_job(engine, job_id, settings) == "succeeded"
    job, steps, events, ckpts = _job(engine, job_id)
    assert (job.status, job.step, job.error) == ("succeeded", 12, None)
    assert job.tokens_seen == 12 * 4 * 16  # the global batch: 2 ranks x 2 rows
    assert steps == list(range(1, 13))
    assert events.count("started") == 1 and events[-1] == "finished"
    assert ckpts == [10, 12]
    assert sorted(p.name for p in (settings.storage_dir / "checkpoints" / job_id).iterdir()) == [
        "step_10.pt", "step_12.pt"]
    assert not ranks_alive()


class KillsRankOne(DbReporter):
    """Kills rank 1 once the checkpoint of step 5 is recorded (a rank lost to the OOM killer)."""

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        super().on_checkpoint(info)
        if info["step"] == 5:
            rank1 = next(p for p in ranks_alive() if p.name == f"{RANK_PROCESS_PREFIX}1")
            os.kill(rank1.pid, signal.SIGKILL)


def test_a_dying_rank_fails_the_whole_job(engine: Engine, settings: WorkerSettings, monkeypatch: Any) -> None:
    monkeypatch.setattr(service, "DbReporter", KillsRankOne)
    job_id = make_job(engine, settings.storage_dir, spec=TWO_DEVICES)
    assert run_train_job(engine, job_id, settings) == "failed"
    job, steps, events, ckpts = _job(engine, job_id)
    assert job.status == "failed" and job.lease_token is None
    assert "rank 1 of 2 was killed by SIGKILL" in job.error and "resources.devices" in job.error
    assert events[-1] == "failed" and "finished" not in events
    assert ckpts == [5] and max(steps) < 12  # the work up to the checkpoint is kept
    assert not ranks_alive()  # rank 0 was stopped with it


def test_more_devices_than_the_worker_has_fails_the_job_with_the_field(engine: Engine, settings: WorkerSettings) -> None:
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the two GPUs the job asks for")
    job_id = make_job(engine, settings.storage_dir, spec=TWO_DEVICES)
    gpu_worker = replace(settings, device="cuda")
    assert run_train_job(engine, job_id, gpu_worker) == "failed"
    job, steps, events, _ = _job(engine, job_id)
    assert job.status == "failed" and steps == [] and events[-1] == "failed"
    assert job.error == (f"cannot train this spec here: resources.devices: the job asks for 2 devices; "
                         f"this worker has {torch.cuda.device_count()}")
    assert not ranks_alive()
