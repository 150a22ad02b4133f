"""What the tasks do: claim, run the engine with reporting callbacks, write the final state.

Every path out of `run_train_job` leaves the job in a final state or handed back
to the queue; an unexpected exception marks it failed, never leaves it running.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, select, update

from app.models import Checkpoint, Dataset, Job, LayerMetric, Sample, StepMetric
from worker.db import utcnow
from worker.engine.checkpoint import checkpoint_path, file_sha256
from worker.leases import Heartbeat, add_event, claim_job, finish_job, release_job
from worker.reporting import DbReporter, diagnosis_values
from worker.settings import WorkerSettings, pick_device

log = logging.getLogger(__name__)

# Set when this worker process is asked to shut down: running jobs checkpoint and go back to the queue.
SHUTDOWN = threading.Event()

SAMPLE_PARAMS = ("max_new_tokens", "temperature", "top_k", "seed")


class JobInputError(Exception):
    """The job cannot start for a reason the user can act on (missing dataset, bad spec)."""


@dataclass
class StopFlags:
    """Why a run should stop; polled by the trainer every step, so plain memory reads."""

    heartbeat: Heartbeat
    deadline: float  # time.monotonic() value
    timed_out: bool = False

    def __call__(self) -> bool:
        hb = self.heartbeat
        if hb.cancel.is_set() or hb.lost.is_set() or SHUTDOWN.is_set():
            return True
        if time.monotonic() >= self.deadline:
            self.timed_out = True
        return self.timed_out


def dataset_path(storage: Path, sha256: str) -> Path:
    """Content-addressed location of an uploaded corpus."""
    return storage / "datasets" / f"{sha256}.txt"


def checkpoint_dir(storage: Path, job_id: str) -> Path:
    """Folder of a job's checkpoint files."""
    return storage / "checkpoints" / job_id


def find_resume_point(engine: Engine, job_id: str, storage: Path) -> tuple[Path | None, int]:
    """Newest recorded checkpoint whose file exists and matches its sha256, and its step (0: none)."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(Checkpoint.step, Checkpoint.sha256).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc())
        ).all()
    for step, sha in rows:
        path = checkpoint_path(checkpoint_dir(storage, job_id), step)
        if path.is_file() and file_sha256(path) == sha:
            return path, step
        log.warning("job %s: checkpoint at step %s is missing or corrupt; trying an older one", job_id, step)
    return None, 0


def forget_after(engine: Engine, job_id: str, step: int, storage: Path) -> None:
    """Drop records and files past the resume point: the lost attempt's steps are re-run and rewritten."""
    with engine.begin() as conn:
        conn.execute(delete(StepMetric).where(StepMetric.job_id == job_id, StepMetric.step > step))
        conn.execute(delete(LayerMetric).where(LayerMetric.job_id == job_id, LayerMetric.step > step))
        conn.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step > step))
    # stale newer files would outrank the new ones when the engine prunes to keep_last
    for path in checkpoint_dir(storage, job_id).glob("step_*.pt"):
        if path.stem.removeprefix("step_").isdigit() and int(path.stem.removeprefix("step_")) > step:
            path.unlink(missing_ok=True)


def load_inputs(engine: Engine, job_id: str, storage: Path) -> tuple[dict[str, Any], str, Any]:
    """The job's raw spec, its dataset text and its started_at; JobInputError when unusable."""
    with engine.connect() as conn:
        job = conn.execute(select(Job.spec, Job.dataset_id, Job.started_at).where(Job.id == job_id)).one()
        sha = None
        if job.dataset_id is not None:
            sha = conn.execute(select(Dataset.sha256).where(Dataset.id == job.dataset_id)).scalar_one_or_none()
    if sha is None:
        raise JobInputError("the job's dataset was deleted; upload it again and submit a new job")
    path = dataset_path(storage, sha)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise JobInputError(f"dataset file {path.name} is missing from storage") from exc
    return dict(job.spec), text, job.started_at


def time_left_s(started_at: Any, limit_s: float) -> float:
    """Seconds left of the job's time limit, counted from its first start."""
    if started_at is None:
        return limit_s
    return limit_s - (utcnow() - started_at).total_seconds()


def format_seconds(value: float) -> str:
    """`86400` rather than `86400.0` in messages."""
    return f"{value:g}"


def run_train_job(engine: Engine, job_id: str, settings: WorkerSettings) -> str:
    """Claim and train one job; returns what happened (for logs and tests)."""
    worker_id = settings.worker_id
    if not claim_job(engine, job_id, worker_id, settings.lease_s):
        log.info("job %s not claimable (another worker has it, or it is finished or cancelled)", job_id)
        return "skipped"
    try:
        return _train_claimed(engine, job_id, settings)
    except JobInputError as exc:
        _fail(engine, job_id, worker_id, str(exc))
        return "failed"
    except Exception as exc:
        log.exception("job %s crashed", job_id)
        _fail(engine, job_id, worker_id, describe_crash(exc))
        return "failed"


def describe_crash(exc: Exception) -> str:
    """Words for an unexpected exception; out-of-memory gets a fix the user can apply."""
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return ("out of device memory: lower training.batch_size or training.seq_len, use "
                "training.grad_accum_steps, or shrink the model")
    return f"internal error in the worker: {type(exc).__name__}: {exc}"


def _fail(engine: Engine, job_id: str, worker_id: str, error: str) -> None:
    if finish_job(engine, job_id, worker_id, "failed", error=error):
        add_event(engine, job_id, "failed", error)


def _train_claimed(engine: Engine, job_id: str, settings: WorkerSettings) -> str:
    from worker.engine.config import SpecError, parse_spec
    from worker.engine.data import DataError
    from worker.engine.trainer import Trainer

    raw_spec, text, started_at = load_inputs(engine, job_id, settings.storage_dir)
    try:
        spec = parse_spec(raw_spec)
    except SpecError as exc:
        raise JobInputError(f"invalid spec: {exc}") from exc
    resume_from, resume_step = find_resume_point(engine, job_id, settings.storage_dir)
    forget_after(engine, job_id, resume_step, settings.storage_dir)
    device = pick_device(settings.device)
    with Heartbeat(engine, job_id, settings.worker_id, settings.lease_s, settings.heartbeat_s) as hb:
        stop = StopFlags(hb, time.monotonic() + time_left_s(started_at, settings.job_time_limit_s))
        reporter = DbReporter(engine, job_id, retry_s=settings.db_retry_s, stop=stop, fenced=hb.lost.is_set)
        try:
            trainer = Trainer(spec, text, checkpoint_dir(settings.storage_dir, job_id), reporter,
                              device=device, resume_from=resume_from)
        except DataError as exc:
            raise JobInputError(f"cannot train on this dataset: {exc}") from exc
        except ValueError as exc:  # a spec this device cannot run (e.g. fp16 recurrent layers on CPU)
            raise JobInputError(f"cannot train this spec here: {exc}") from exc
        result = trainer.run()
    return _record_result(engine, job_id, settings, result, stop, hb, reporter.checkpoint_error)


def final_checkpoint_missing(result: Any, checkpoint_error: str | None) -> str | None:
    """The error of a run that trained to the end but could not store its final checkpoint, else None."""
    if result.status != "succeeded":
        return None
    if result.checkpoint is not None and int(result.checkpoint["step"]) == int(result.step):
        return None
    kept = f"the last stored checkpoint is at step {result.checkpoint['step']}" if result.checkpoint else (
        "no checkpoint was stored")
    return (f"trained {result.step} steps but the final checkpoint could not be stored "
            f"({checkpoint_error or 'checkpoint not written'}); {kept}. Free space in the storage folder "
            "(or make it writable) and submit the job again")


def _record_result(engine: Engine, job_id: str, settings: WorkerSettings, result: Any,
                   stop: StopFlags, hb: Heartbeat, checkpoint_error: str | None = None) -> str:
    """Map the trainer's ending onto the job's final state."""
    worker_id = settings.worker_id
    diagnosed = diagnosis_values(result.diagnosis, result.summary)
    if hb.lost.is_set():
        return "lost"
    status, error = result.status, result.error
    missing = final_checkpoint_missing(result, checkpoint_error)
    if missing and find_resume_point(engine, job_id, settings.storage_dir)[1] == result.step:
        missing = None  # resumed at its last step: the stored final checkpoint is the one it resumed from
    if missing:  # a "succeeded" job must have its result stored and downloadable
        status, error = "failed", missing
        add_event(engine, job_id, "failed", error, step=result.step)
    if status == "cancelled" and not hb.cancel.is_set():
        if stop.timed_out:
            status, error = "failed", f"time limit of {format_seconds(settings.job_time_limit_s)} s exceeded"
            add_event(engine, job_id, "failed", error, step=result.step)
        elif SHUTDOWN.is_set() and release_job(engine, job_id, worker_id):
            add_event(engine, job_id, "requeued", "worker shutting down; the job resumes from its checkpoint",
                      step=result.step)
            return "released"
    finish_job(engine, job_id, worker_id, status, error=error, **diagnosed)
    return status


def claim_sample(engine: Engine, sample_id: str) -> bool:
    """Take a queued sample request; False when it was already taken."""
    with engine.begin() as conn:
        stmt = (update(Sample).where(Sample.id == sample_id, Sample.status == "queued")
                .values(status="running", started_at=utcnow()))
        return conn.execute(stmt).rowcount == 1


def finish_sample(engine: Engine, sample_id: str, text: str | None, error: str | None) -> None:
    """Store the generated text or the error."""
    values = {"status": "failed" if error else "succeeded", "text": text, "error": error, "finished_at": utcnow()}
    with engine.begin() as conn:
        # only a running sample: one the reconciler already timed out stays failed
        conn.execute(update(Sample).where(Sample.id == sample_id, Sample.status == "running").values(**values))


def run_sample(engine: Engine, sample_id: str, settings: WorkerSettings) -> str:
    """Generate text for one sample request from its checkpoint."""
    if not claim_sample(engine, sample_id):
        return "skipped"
    try:
        with engine.connect() as conn:
            sample = conn.execute(select(Sample).where(Sample.id == sample_id)).one()
        path = checkpoint_path(checkpoint_dir(settings.storage_dir, sample.job_id), sample.checkpoint_step)
        if not path.is_file():
            finish_sample(engine, sample_id, None, f"checkpoint at step {sample.checkpoint_step} no longer exists")
            return "failed"
        from worker.engine.sampling import sample_from_checkpoint

        params = {k: v for k, v in (sample.params or {}).items() if k in SAMPLE_PARAMS}
        text = sample_from_checkpoint(path, sample.prompt, device=pick_device(settings.device), **params)
    except Exception as exc:
        log.exception("sample %s failed", sample_id)
        finish_sample(engine, sample_id, None, f"sampling failed: {type(exc).__name__}: {exc}")
        return "failed"
    finish_sample(engine, sample_id, text, None)
    return "succeeded"
