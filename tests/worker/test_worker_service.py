"""run_train_job / run_sample in-process with the real engine on a real database (no Celery)."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update

from app.models import Checkpoint, Event, Job, LayerMetric, Sample, StepMetric, new_id
from stabletrain_storage import LocalStorage, StorageError
from tests.worker.jobfactory import TINY_SPEC, make_job
from worker import service
from worker.artifacts import with_storage_retry
from worker.db import utcnow
from worker.engine.diagnosis import health_of
from worker.service import run_sample, run_train_job
from worker.settings import WorkerSettings
from worker.testing import wait_for


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: keep the tiny runs from fighting over them
    yield
    torch.set_num_threads(before)


def spec_with(**training: Any) -> dict[str, Any]:
    return {**TINY_SPEC, "training": {**TINY_SPEC["training"], **training}}


def job(engine: Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(Job).where(Job.id == job_id)).one()


def steps(engine: Engine, job_id: str) -> list[int]:
    with engine.connect() as conn:
        return list(conn.execute(select(StepMetric.step).where(StepMetric.job_id == job_id)
                                 .order_by(StepMetric.step)).scalars())


def checkpoints(engine: Engine, job_id: str) -> list[Any]:
    with engine.connect() as conn:
        return conn.execute(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)).all()


def event_messages(engine: Engine, job_id: str) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(Event.message).where(Event.job_id == job_id).order_by(Event.id)).scalars())


def event_kinds(engine: Engine, job_id: str) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(Event.kind).where(Event.job_id == job_id).order_by(Event.id)).scalars())


def test_job_trains_to_success_with_all_records(engine: Engine, settings: WorkerSettings) -> None:
    job_id = make_job(engine, settings.storage_dir)
    assert run_train_job(engine, job_id, settings) == "succeeded"
    row = job(engine, job_id)
    assert (row.status, row.step, row.attempts, row.error, row.lease_expires_at) == ("succeeded", 12, 1, None, None)
    assert row.finished_at is not None and row.latest["step"] == 12 and row.tokens_seen == 12 * 4 * 16
    assert set(row.diagnosis) == {"findings", "summary"} and isinstance(row.diagnosis["findings"], list)
    assert row.health == health_of(row.diagnosis["findings"])
    assert steps(engine, job_id) == list(range(1, 13))
    with engine.connect() as conn:
        layer_steps = set(conn.execute(select(LayerMetric.step).where(LayerMetric.job_id == job_id)).scalars())
    assert layer_steps == {3, 6, 9, 12}
    ckpts = checkpoints(engine, job_id)
    assert [c.step for c in ckpts] == [10, 12]  # keep_last 2 pruned step 5's record with its file
    for c in ckpts:
        path = settings.storage_dir / "checkpoints" / job_id / f"step_{c.step}.pt"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == c.sha256 and path.stat().st_size == c.bytes
    kinds = event_kinds(engine, job_id)
    assert kinds[0] == "started" and kinds[-1] == "finished"


def test_duplicate_delivery_of_a_held_job_is_dropped(engine: Engine, settings: WorkerSettings) -> None:
    from datetime import timedelta

    job_id = make_job(engine, settings.storage_dir, status="running", worker_id="other",
                      lease_expires_at=utcnow() + timedelta(seconds=30), attempts=1)
    assert run_train_job(engine, job_id, settings) == "skipped"
    assert (job(engine, job_id).worker_id, steps(engine, job_id)) == ("other", [])


def test_a_message_trains_the_fair_next_job_not_the_one_it_names(engine: Engine, settings: WorkerSettings) -> None:
    served = make_job(engine, settings.storage_dir, status="succeeded", claimed_at=utcnow())
    with engine.connect() as conn:
        owner = conn.execute(select(Job.owner_id).where(Job.id == served)).scalar_one()
    backlog = make_job(engine, settings.storage_dir)
    with engine.begin() as conn:  # the key just served queues another job; a new key queues one after it
        conn.execute(update(Job).where(Job.id == backlog).values(owner_id=owner))
    newcomer = make_job(engine, settings.storage_dir)
    assert run_train_job(engine, backlog, settings) == "succeeded"
    assert (job(engine, newcomer).status, job(engine, backlog).status) == ("succeeded", "queued")
    assert run_train_job(engine, newcomer, settings) == "succeeded"  # its message now runs the other one
    assert job(engine, backlog).status == "succeeded"


def test_diverging_spec_fails_with_the_engines_reason(engine: Engine, settings: WorkerSettings) -> None:
    # the engine tests' exploding RNN: relu recurrence, no clipping, large lr
    spec = {**TINY_SPEC,
            "model": {"arch": "rnn", "activation": "relu", "d_model": 32, "hidden": 64, "init": "normal",
                      "init_std": 0.1},
            "training": {"max_steps": 60, "batch_size": 8, "seq_len": 32, "lr": 1.0, "optimizer": "sgd"},
            "stabilization": {"clip": {"mode": "none"}, "nonfinite": "stop"}}
    job_id = make_job(engine, settings.storage_dir, spec=spec)
    assert run_train_job(engine, job_id, settings) == "failed"
    row = job(engine, job_id)
    assert row.status == "failed" and "non-finite" in row.error, row.error
    assert row.diagnosis["findings"], "a diverged run has findings"
    assert row.health == "critical" == health_of(row.diagnosis["findings"])  # one health: the diagnosis'


def test_missing_dataset_file_fails_clearly(engine: Engine, settings: WorkerSettings) -> None:
    job_id = make_job(engine, corpus="never uploaded")  # dataset row but no file in storage
    assert run_train_job(engine, job_id, settings) == "failed"
    row = job(engine, job_id)
    assert row.status == "failed" and "missing from storage" in row.error
    assert event_kinds(engine, job_id) == ["failed"]


def test_time_limit_fails_the_job(engine: Engine, settings: WorkerSettings) -> None:
    job_id = make_job(engine, settings.storage_dir, spec=spec_with(max_steps=1_000_000))
    assert run_train_job(engine, job_id, replace(settings, job_time_limit_s=1.0)) == "failed"
    row = job(engine, job_id)
    assert row.error == "time limit of 1 s exceeded" and row.step > 0
    assert checkpoints(engine, job_id), "the stop wrote a final checkpoint"


def run_in_thread(engine: Engine, job_id: str, settings: WorkerSettings) -> tuple[threading.Thread, list[str]]:
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(run_train_job(engine, job_id, settings)), daemon=True)
    thread.start()
    return thread, result


def test_cancel_of_a_running_job_stops_it_with_a_final_checkpoint(engine: Engine, settings: WorkerSettings) -> None:
    job_id = make_job(engine, settings.storage_dir, spec=spec_with(max_steps=1_000_000))
    thread, result = run_in_thread(engine, job_id, settings)
    wait_for(lambda: job(engine, job_id).step > 0, 60, "the first metrics")
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(status="cancelling", cancel_requested=True))
    thread.join(timeout=30)
    assert result == ["cancelled"]
    row = job(engine, job_id)
    assert row.status == "cancelled" and row.finished_at is not None
    assert checkpoints(engine, job_id)[-1].step == row.step


def test_shutdown_hands_the_job_back_and_the_next_run_resumes(engine: Engine, settings: WorkerSettings) -> None:
    job_id = make_job(engine, settings.storage_dir, spec=spec_with(max_steps=1_000_000))
    thread, result = run_in_thread(engine, job_id, settings)
    wait_for(lambda: job(engine, job_id).step > 0, 60, "the first metrics")
    service.SHUTDOWN.set()
    try:
        thread.join(timeout=30)
    finally:
        service.SHUTDOWN.clear()
    assert result == ["released"]
    row = job(engine, job_id)
    assert (row.status, row.worker_id, row.enqueued_at, row.lease_token, row.attempts) == (
        "queued", None, None, None, 0)
    stopped_at = checkpoints(engine, job_id)[-1].step
    # finish 8 steps after the checkpoint; a stale, unrecorded newer file must not confuse the resume
    stale = settings.storage_dir / "checkpoints" / job_id / f"step_{stopped_at + 100}.pt"
    stale.write_bytes(b"junk")
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(spec=spec_with(max_steps=stopped_at + 8)))
    assert run_train_job(engine, job_id, settings) == "succeeded"
    assert steps(engine, job_id) == list(range(1, stopped_at + 9))
    assert job(engine, job_id).attempts == 1 and not stale.exists()  # a graceful hand-back is no attempt
    kinds = event_kinds(engine, job_id)
    assert "requeued" in kinds and "resumed" in kinds


def test_resume_skips_a_corrupt_newest_checkpoint(engine: Engine, settings: WorkerSettings, tmp_path: Path) -> None:
    job_id = make_job(engine, settings.storage_dir)
    assert run_train_job(engine, job_id, settings) == "succeeded"
    newest = settings.storage_dir / "checkpoints" / job_id / "step_12.pt"
    newest.write_bytes(b"corrupt")
    path, step = service.find_resume_point(engine, job_id, settings.storage)
    assert (path.name, step) == ("step_10.pt", 10)


def test_sample_generates_text_from_a_checkpoint(engine: Engine, settings: WorkerSettings) -> None:
    job_id = make_job(engine, settings.storage_dir)
    assert run_train_job(engine, job_id, settings) == "succeeded"
    row = job(engine, job_id)
    ok, gone = new_id("smp"), new_id("smp")
    with engine.begin() as conn:
        conn.execute(Sample.__table__.insert(), [
            dict(id=ok, job_id=job_id, owner_id=row.owner_id, checkpoint_step=12, prompt="line",
                 params={"max_new_tokens": 20, "temperature": 0.8, "top_k": 5, "seed": 1}, status="queued",
                 created_at=utcnow()),
            dict(id=gone, job_id=job_id, owner_id=row.owner_id, checkpoint_step=5, prompt="x", params={},
                 status="queued", created_at=utcnow()),
        ])
    assert run_sample(engine, ok, settings) == "succeeded"
    # a duplicate of ok's message runs the next queued sample; gone's own message then finds none
    assert run_sample(engine, ok, settings) == "failed"
    assert run_sample(engine, gone, settings) == "skipped"
    with engine.connect() as conn:
        done = {s.id: s for s in conn.execute(select(Sample).where(Sample.job_id == job_id))}
    assert isinstance(done[ok].text, str) and done[ok].text and done[ok].finished_at is not None
    assert done[gone].status == "failed" and "no longer exists" in done[gone].error


def test_crash_descriptions() -> None:
    import torch

    assert service.describe_crash(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
                                  ).startswith("out of device memory: lower training.batch_size")
    assert service.describe_crash(KeyError("x")) == "internal error in the worker: KeyError: 'x'"
    assert service.describe_crash(StorageError("storage: listing of checkpoints/ failed: timeout")) == (
        "the storage could not be reached (storage: listing of checkpoints/ failed: timeout); "
        "retry the job once it is back")


def test_a_running_job_has_a_current_diagnosis(engine: Engine, settings: WorkerSettings) -> None:
    spec = {**spec_with(max_steps=1_000_000), "checkpointing": {"every_steps": 5, "keep_last": 2}}
    job_id = make_job(engine, settings.storage_dir, spec=spec)
    thread, result = run_in_thread(engine, job_id, settings)
    wait_for(lambda: job(engine, job_id).diagnosis is not None, 60, "a diagnosis while running")
    row = job(engine, job_id)
    assert row.status == "running"
    assert set(row.diagnosis) == {"findings", "summary"}
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(status="cancelling", cancel_requested=True))
    thread.join(timeout=30)
    assert result == ["cancelled"]


class OutageStorage(LocalStorage):
    """The folder store behind an endpoint that refuses the first `down_for` reads (a bucket restarting)."""

    def __init__(self, root: Path, down_for: int) -> None:
        super().__init__(root)
        self.down_for, self.refused = down_for, 0

    def local_copy(self, key: str, refresh: bool = False) -> Path:
        if self.refused < self.down_for:
            self.refused += 1
            raise StorageError(f"storage: download of {key} failed: connection refused")
        return super().local_copy(key, refresh)


@dataclass(frozen=True)
class SettingsWithStore(WorkerSettings):
    store: Any = None

    @property
    def storage(self) -> Any:
        return self.store


def with_outage(settings: WorkerSettings, down_for: int, retry_s: float) -> SettingsWithStore:
    return SettingsWithStore(**{**settings.__dict__, "storage_retry_s": retry_s},
                             store=OutageStorage(settings.storage_dir, down_for))


def test_a_bucket_outage_at_the_start_is_waited_out(engine: Engine, settings: WorkerSettings) -> None:
    job_id = make_job(engine, settings.storage_dir)
    outage = with_outage(settings, down_for=2, retry_s=60)
    assert run_train_job(engine, job_id, outage) == "succeeded"
    assert outage.store.refused == 2 and job(engine, job_id).attempts == 1


def test_a_bucket_that_stays_down_fails_the_job_saying_so(engine: Engine, settings: WorkerSettings) -> None:
    job_id = make_job(engine, settings.storage_dir)
    assert run_train_job(engine, job_id, with_outage(settings, down_for=10**9, retry_s=1.0)) == "failed"
    assert job(engine, job_id).error.startswith("the storage could not be reached (storage: download of datasets/")


def test_a_shutdown_during_a_bucket_outage_hands_the_job_back(engine: Engine, settings: WorkerSettings) -> None:
    job_id = make_job(engine, settings.storage_dir)
    service.SHUTDOWN.set()
    try:
        assert run_train_job(engine, job_id, with_outage(settings, down_for=10**9, retry_s=600)) == "released"
    finally:
        service.SHUTDOWN.clear()
    row = job(engine, job_id)
    assert (row.status, row.attempts, row.lease_token, row.error) == ("queued", 0, None, None)
    assert "requeued" in event_kinds(engine, job_id)


@pytest.mark.parametrize(("asked", "outcome"), [("cancelling", "cancelled"), ("pausing", "paused")])
def test_a_cancel_or_pause_during_a_bucket_outage_ends_the_wait(engine: Engine, settings: WorkerSettings,
                                                                asked: str, outcome: str) -> None:
    job_id = make_job(engine, settings.storage_dir)
    outage = with_outage(settings, down_for=10**9, retry_s=600)
    thread, result = run_in_thread(engine, job_id, outage)
    wait_for(lambda: outage.store.refused >= 2, 30, "the job to wait for the storage")
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(status=asked, cancel_requested=asked == "cancelling"))
    thread.join(timeout=30)
    assert result == [outcome]  # at once, not after the 600 s the wait would allow
    row = job(engine, job_id)
    assert row.status == outcome and row.error is None
    assert f"{outcome} while the storage was unreachable" in " ".join(event_messages(engine, job_id))


def test_storage_retry_backs_off_and_lets_a_missing_object_through() -> None:
    sleeps: list[float] = []

    def down_for(failures: int) -> Any:
        calls: list[int] = []

        def read() -> str:
            calls.append(1)
            if len(calls) <= failures:
                raise StorageError("storage: read failed: 503")
            return "ok"
        return read, calls

    read, calls = down_for(3)
    assert with_storage_retry(read, deadline_s=60, what="t", sleep=sleeps.append) == "ok"
    assert sleeps == [0.5, 1.0, 2.0] and len(calls) == 4

    def missing() -> str:
        raise FileNotFoundError("datasets/x is not stored")

    with pytest.raises(FileNotFoundError):
        with_storage_retry(missing, deadline_s=60, what="t", sleep=sleeps.append)
    assert len(sleeps) == 3  # no outage: not retried
    read, calls = down_for(10**9)
    with pytest.raises(StorageError):
        with_storage_retry(read, deadline_s=60, what="t", stop_waiting=lambda: True, sleep=sleeps.append)
    assert len(calls) == 1 and len(sleeps) == 3
