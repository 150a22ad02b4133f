"""What the tasks do: claim, run the engine with reporting callbacks, write the final state.

Every path out of `run_train_job` leaves the job in a final state or handed back
to the queue; an unexpected exception marks it failed, never leaves it running.

A train message is a "work available" token: the worker claims the fair next queued
job (`worker.leases.next_fair_job`), not necessarily the one the message names, so
one key's backlog cannot starve another key; a stale or duplicate message claims
nothing. Every write after the claim is fenced by the claim's lease token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, select, update

from app.models import Checkpoint, Dataset, Job, LayerMetric, Sample, StepMetric, next_fair_sample
from worker.db import utcnow
from worker.engine.checkpoint import checkpoint_path, file_sha256
from worker.engine.corpus import CorpusFile
from worker.leases import (
    Heartbeat,
    Lease,
    add_event,
    claim_job,
    claim_next_job,
    finish_job,
    hold,
    release_job,
)
from worker.logs import log_context
from worker.reporting import DbReporter, diagnosis_values
from worker.settings import WorkerSettings, pick_device

log = logging.getLogger(__name__)

# Set when this worker process is asked to shut down: running jobs checkpoint and go back to the queue.
SHUTDOWN = threading.Event()

SAMPLE_PARAMS = ("max_new_tokens", "temperature", "top_k", "seed")
CLAIM_TRIES = 5


class Activity:
    """Whether this worker process is running a task, and since when it has been idle.

    The reconciler of an idle worker re-sends queued jobs that waited longer than it has
    been idle: their messages must be lost, or this worker would have received one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._idle_since = time.monotonic()

    @contextmanager
    def busy(self) -> Iterator[None]:
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                self._idle_since = time.monotonic()

    def idle_for_s(self) -> float:
        """Seconds since the last task ended (or the process started); 0 while one runs."""
        with self._lock:
            return 0.0 if self._running else time.monotonic() - self._idle_since


ACTIVITY = Activity()


class JobInputError(Exception):
    """The job cannot start for a reason the user can act on (missing dataset, bad spec)."""


class LeaseLost(Exception):
    """Another worker claimed the job (our lease expired): stop, writing nothing more."""


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


def token_cache_dir(storage: Path) -> Path:
    """Folder of the tokenized corpora (`<sha256>-<tokenizer>.u16` + sidecar, worker/engine/corpus.py)."""
    return storage / "tokens"


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


def forget_after(engine: Engine, lease: Lease, step: int, storage: Path) -> None:
    """Drop records and files past the resume point: the lost attempt's steps are re-run and rewritten."""
    job_id = lease.job_id
    with engine.begin() as conn:
        if not hold(conn, lease):
            raise LeaseLost(job_id)
        conn.execute(delete(StepMetric).where(StepMetric.job_id == job_id, StepMetric.step > step))
        conn.execute(delete(LayerMetric).where(LayerMetric.job_id == job_id, LayerMetric.step > step))
        conn.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step > step))
    # stale newer files would outrank the new ones when the engine prunes to keep_last
    for path in checkpoint_dir(storage, job_id).glob("step_*.pt"):
        if path.stem.removeprefix("step_").isdigit() and int(path.stem.removeprefix("step_")) > step:
            path.unlink(missing_ok=True)


def load_inputs(engine: Engine, job_id: str, storage: Path) -> tuple[dict[str, Any], CorpusFile, Any]:
    """The job's raw spec, its dataset file (a local path, never read into memory here, and the token
    cache folder) and its started_at; JobInputError when unusable."""
    with engine.connect() as conn:
        job = conn.execute(select(Job.spec, Job.dataset_id, Job.started_at).where(Job.id == job_id)).one()
        sha = None
        if job.dataset_id is not None:
            sha = conn.execute(select(Dataset.sha256).where(Dataset.id == job.dataset_id)).scalar_one_or_none()
    if sha is None:
        raise JobInputError("the job's dataset was deleted; upload it again and submit a new job")
    path = dataset_path(storage, sha)
    if not path.is_file():
        raise JobInputError(f"dataset file {path.name} is missing from storage")
    return dict(job.spec), CorpusFile(path, token_cache_dir(storage), sha), job.started_at


def time_left_s(started_at: Any, limit_s: float) -> float:
    """Seconds left of the job's time limit, counted from its first start."""
    if started_at is None:
        return limit_s
    return limit_s - (utcnow() - started_at).total_seconds()


def format_seconds(value: float) -> str:
    """`86400` rather than `86400.0` in messages."""
    return f"{value:g}"


def run_train_job(engine: Engine, job_id: str, settings: WorkerSettings) -> str:
    """On a train message for `job_id`: claim the fair next queued job and train it.

    Returns what happened (for logs and tests). The message's own job is claimed only when
    nothing is queued and its lease expired (its worker died and no reconciler requeued it yet).
    """
    with ACTIVITY.busy():
        lease = (claim_next_job(engine, settings.worker_id, settings.lease_s)
                 or claim_job(engine, job_id, settings.worker_id, settings.lease_s))
        if lease is None:
            log.info("job %s not claimable and no job is queued (another worker has it, or it is finished "
                     "or cancelled)", job_id)
            return "skipped"
        if lease.job_id != job_id:
            log.info("message for job %s: claimed %s, the fair next job", job_id, lease.job_id)
        with log_context(job_id=lease.job_id):
            return _train(engine, lease, settings)


def _train(engine: Engine, lease: Lease, settings: WorkerSettings) -> str:
    try:
        return _train_claimed(engine, lease, settings)
    except LeaseLost:
        log.warning("job %s was taken over by another worker; stopped without writing", lease.job_id)
        return "lost"
    except JobInputError as exc:
        _fail(engine, lease, str(exc))
        return "failed"
    except Exception as exc:
        log.exception("job %s crashed", lease.job_id)
        _fail(engine, lease, describe_crash(exc))
        return "failed"


def describe_crash(exc: Exception) -> str:
    """Words for an unexpected exception; out-of-memory gets a fix the user can apply."""
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return ("out of device memory: lower training.batch_size or training.seq_len, use "
                "training.grad_accum_steps, or shrink the model")
    return f"internal error in the worker: {type(exc).__name__}: {exc}"


def _fail(engine: Engine, lease: Lease, error: str) -> None:
    finish_job(engine, lease, "failed", error=error, event=("failed", error))


def _train_claimed(engine: Engine, lease: Lease, settings: WorkerSettings) -> str:
    from worker.engine.config import SpecError, parse_spec
    from worker.engine.data import DataError
    from worker.engine.trainer import Trainer

    job_id = lease.job_id
    raw_spec, corpus, started_at = load_inputs(engine, job_id, settings.storage_dir)
    try:
        spec = parse_spec(raw_spec)
    except SpecError as exc:
        raise JobInputError(f"invalid spec: {exc}") from exc
    resume_from, resume_step = find_resume_point(engine, job_id, settings.storage_dir)
    forget_after(engine, lease, resume_step, settings.storage_dir)
    device = pick_device(settings.device)
    with Heartbeat(engine, lease, settings.lease_s, settings.heartbeat_s) as hb:
        stop = StopFlags(hb, time.monotonic() + time_left_s(started_at, settings.job_time_limit_s))
        reporter = DbReporter(engine, job_id, retry_s=settings.db_retry_s, stop=stop, fenced=hb.lost.is_set,
                              lease=lease, on_lease_lost=hb.lost.set)
        try:
            trainer = Trainer(spec, corpus, checkpoint_dir(settings.storage_dir, job_id), reporter,
                              device=device, resume_from=resume_from)
        except DataError as exc:
            raise JobInputError(f"cannot train on this dataset: {exc}") from exc
        except ValueError as exc:  # a spec this device cannot run (e.g. fp16 recurrent layers on CPU)
            raise JobInputError(f"cannot train this spec here: {exc}") from exc
        result = trainer.run()
    return _record_result(engine, lease, settings, result, stop, hb, reporter.checkpoint_error)


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


def _record_result(engine: Engine, lease: Lease, settings: WorkerSettings, result: Any,
                   stop: StopFlags, hb: Heartbeat, checkpoint_error: str | None = None) -> str:
    """Map the trainer's ending onto the job's final state (every write fenced by the lease)."""
    job_id = lease.job_id
    diagnosed = diagnosis_values(result.diagnosis, result.summary)
    if hb.lost.is_set():
        return "lost"
    status, error = result.status, result.error
    missing = final_checkpoint_missing(result, checkpoint_error)
    if missing and find_resume_point(engine, job_id, settings.storage_dir)[1] == result.step:
        missing = None  # resumed at its last step: the stored final checkpoint is the one it resumed from
    if missing:  # a "succeeded" job must have its result stored and downloadable
        status, error = "failed", missing
        add_event(engine, lease, "failed", error, step=result.step)
    if status == "cancelled" and not hb.cancel.is_set():
        if stop.timed_out:
            status, error = "failed", f"time limit of {format_seconds(settings.job_time_limit_s)} s exceeded"
            add_event(engine, lease, "failed", error, step=result.step)
        elif SHUTDOWN.is_set() and release_job(
                engine, lease, "worker shutting down; the job resumes from its checkpoint", step=result.step):
            return "released"
    if not finish_job(engine, lease, status, error=error, **diagnosed):
        return "lost"
    return status


def claim_sample(engine: Engine) -> str | None:
    """Take the queued sample next in fairness order (app.models.next_fair_sample); None when none is queued.

    A message runs whichever sample is fairest, not necessarily its own: every queued sample has a
    message of its own, so each message runs one sample and a message finding nothing queued (its
    sample ran on an earlier message's turn, or a duplicate delivery) is skipped."""
    pick = next_fair_sample().correlate(None).scalar_subquery()
    for _ in range(CLAIM_TRIES):
        # one UPDATE picks and takes: it holds SQLite's write lock before it reads, and on PostgreSQL
        # a worker that lost the row to another finds it no longer queued and picks again
        with engine.begin() as conn:
            taken = conn.execute(update(Sample).where(Sample.id == pick, Sample.status == "queued")
                                 .values(status="running", started_at=utcnow()).returning(Sample.id)).scalar_one_or_none()
        if taken is not None:
            return taken
        with engine.connect() as conn:
            if conn.execute(select(pick)).scalar_one_or_none() is None:
                return None
    return None  # other workers kept taking the pick first: their messages cover what is left


def finish_sample(engine: Engine, sample_id: str, text: str | None, error: str | None) -> None:
    """Store the generated text or the error."""
    values = {"status": "failed" if error else "succeeded", "text": text, "error": error, "finished_at": utcnow()}
    with engine.begin() as conn:
        # only a running sample: one the reconciler already timed out stays failed
        conn.execute(update(Sample).where(Sample.id == sample_id, Sample.status == "running").values(**values))


def run_sample(engine: Engine, message_sample_id: str, settings: WorkerSettings) -> str:
    """Generate text for the fairest queued sample request (see claim_sample) from its checkpoint."""
    with ACTIVITY.busy():
        return _run_sample(engine, message_sample_id, settings)


def _run_sample(engine: Engine, message_sample_id: str, settings: WorkerSettings) -> str:
    sample_id = claim_sample(engine)
    if sample_id is None:
        return "skipped"
    if sample_id != message_sample_id:
        log.info("message of sample %s runs sample %s (fair order across keys)", message_sample_id, sample_id)
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
