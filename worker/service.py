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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, delete, select, update

from app.models import Checkpoint, Dataset, Job, LayerMetric, Sample, StepMetric, next_fair_sample
from stabletrain_storage import (
    Storage,
    StorageError,
    checkpoint_key,
    checkpoint_prefix,
    checkpoint_step,
    dataset_key,
    fetch_verified,
)
from stabletrain_storage.base import key_name
from worker.artifacts import (
    TOKENS,
    clear_cached_checkpoints,
    local_checkpoint_dir,
    pull_dataset_caches,
    push_dataset_caches,
    with_storage_retry,
)
from worker.db import utcnow
from worker.engine.corpus import CorpusFile
from worker.engine.distributed import RankFailed, run_data_parallel
from worker.leases import (
    Heartbeat,
    Lease,
    add_event,
    claim_job,
    claim_next_job,
    finish_job,
    hold,
    pause_held_job,
    release_job,
)
from worker.logs import log_context
from worker.reporting import DbReporter, diagnosis_values
from worker.settings import WorkerSettings, pick_device

log = logging.getLogger(__name__)
T = TypeVar("T")

# How often a backoff sleep looks for a cancel, pause or shutdown.
INTERRUPT_POLL_S = 0.2

# Set when this worker process is asked to shut down: running jobs checkpoint and go back to the queue.
SHUTDOWN = threading.Event()

SAMPLE_PARAMS = ("max_new_tokens", "temperature", "top_k", "seed")
CLAIM_TRIES = 5
# Seconds beyond the reporter's database retry that a data-parallel rank may wait in a collective
# (a checkpoint write and a diagnosis on rank 0 fit in it).
COLLECTIVE_MARGIN_S = 600


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


class EndedBeforeStart(Exception):
    """The job ended before training started, while its inputs were out of reach: handed back (a shutdown),
    cancelled or paused. `outcome` is what run_train_job returns."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


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


def find_resume_point(engine: Engine, job_id: str, store: Storage) -> tuple[Path | None, int]:
    """Newest recorded checkpoint whose stored file matches its sha256 (a local copy of it) and its step
    (0: none). A bucket's object is fetched into this host's cache, so any host can resume the job."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(Checkpoint.step, Checkpoint.sha256).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc())
        ).all()
    for step, sha in rows:
        path = fetch_verified(store, checkpoint_key(job_id, step), sha)
        if path is not None:
            return path, step
        log.warning("job %s: checkpoint at step %s is missing or corrupt; trying an older one", job_id, step)
    return None, 0


def forget_after(engine: Engine, lease: Lease, step: int, store: Storage) -> None:
    """Drop records and files past the resume point: the lost attempt's steps are re-run and rewritten."""
    job_id = lease.job_id
    with engine.begin() as conn:
        if not hold(conn, lease):
            raise LeaseLost(job_id)
        conn.execute(delete(StepMetric).where(StepMetric.job_id == job_id, StepMetric.step > step))
        conn.execute(delete(LayerMetric).where(LayerMetric.job_id == job_id, LayerMetric.step > step))
        conn.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step > step))
    # stale newer files would outrank the new ones when the engine prunes to keep_last
    for path in local_checkpoint_dir(store, job_id).glob("step_*.pt"):
        if (checkpoint_step(path.name) or 0) > step:
            path.unlink(missing_ok=True)
    if store.is_remote:
        for key in store.list(checkpoint_prefix(job_id)):
            if (checkpoint_step(key) or 0) > step:
                store.delete(key)


def load_inputs(engine: Engine, job_id: str, store: Storage) -> tuple[dict[str, Any], CorpusFile, Any]:
    """The job's raw spec, its dataset file (a local path, never read into memory here, with this host's
    token cache folder) and when its running time started (JobInputError when unusable).

    The running time starts at started_at moved later by the seconds the job spent paused: the job
    time limit counts time spent running or queued, not paused."""
    with engine.connect() as conn:
        job = conn.execute(select(Job.spec, Job.dataset_id, Job.started_at, Job.paused_s)
                           .where(Job.id == job_id)).one()
        sha = None
        if job.dataset_id is not None:
            sha = conn.execute(select(Dataset.sha256).where(Dataset.id == job.dataset_id)).scalar_one_or_none()
    if sha is None:
        raise JobInputError("the job's dataset was deleted; upload it again and submit a new job")
    key = dataset_key(sha)
    try:
        path = store.local_copy(key)
    except FileNotFoundError as exc:
        raise JobInputError(f"dataset file {key_name(key)} is missing from storage") from exc
    started_at = job.started_at and job.started_at + timedelta(seconds=job.paused_s or 0.0)
    return dict(job.spec), CorpusFile(path, store.local_dir(TOKENS), sha), started_at


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
    except EndedBeforeStart as ended:
        return ended.outcome
    except JobInputError as exc:
        _fail(engine, lease, str(exc))
        return "failed"
    except RankFailed as exc:  # one rank of a data-parallel job died: every rank was stopped
        log.error("job %s: %s", lease.job_id, exc)
        _fail(engine, lease, f"{exc}. Its checkpoints are kept; retry the job, or lower resources.devices")
        return "failed"
    except Exception as exc:
        log.exception("job %s crashed", lease.job_id)
        _fail(engine, lease, describe_crash(exc))
        return "failed"


def describe_crash(exc: Exception) -> str:
    """Words for an unexpected exception; out-of-memory gets a fix the user can apply."""
    if isinstance(exc, StorageError):
        return f"the storage could not be reached ({exc}); retry the job once it is back"
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
    store = settings.storage
    device = pick_device(settings.device)
    with Heartbeat(engine, lease, settings.lease_s, settings.heartbeat_s) as hb:
        # under the heartbeat: fetching the dataset or a checkpoint from a bucket, or waiting out a
        # bucket outage, may take longer than the lease
        raw_spec, corpus, started_at = _from_storage(engine, lease, hb, settings.storage_retry_s, "dataset",
                                                     lambda: load_inputs(engine, job_id, store))
        try:
            spec = parse_spec(raw_spec)
        except SpecError as exc:
            raise JobInputError(f"invalid spec: {exc}") from exc
        resume_from, resume_step = _from_storage(engine, lease, hb, settings.storage_retry_s, "checkpoint",
                                                 lambda: find_resume_point(engine, job_id, store))
        forget_after(engine, lease, resume_step, store)
        clear_cached_checkpoints(store, job_id, keep=resume_from)
        pull_dataset_caches(store, corpus.sha256)
        stop = StopFlags(hb, time.monotonic() + time_left_s(started_at, settings.job_time_limit_s))
        reporter = DbReporter(engine, job_id, retry_s=settings.db_retry_s, stop=stop, pause=hb.pause.is_set,
                              fenced=hb.lost.is_set, lease=lease, on_lease_lost=hb.lost.set, store=store,
                              keep_last=spec.checkpointing.keep_last)
        out_dir = local_checkpoint_dir(store, job_id)
        try:
            try:
                if spec.resources.devices > 1:
                    result = run_data_parallel(spec, corpus, out_dir, reporter, device_type=torch_device_type(device),
                                               resume_from=resume_from,
                                               collective_timeout_s=collective_timeout_s(settings))
                else:
                    trainer = Trainer(spec, corpus, out_dir, reporter, device=device, resume_from=resume_from)
                    push_dataset_caches(store, corpus.sha256)  # made at the start: other hosts need not redo them
                    result = trainer.run()
            except DataError as exc:
                raise JobInputError(f"cannot train on this dataset: {exc}") from exc
            except ValueError as exc:  # a spec this device cannot run (fp16 recurrent layers on CPU, too few GPUs)
                raise JobInputError(f"cannot train this spec here: {exc}") from exc
            push_dataset_caches(store, corpus.sha256)  # made by the ranks of a multi-device run (else a no-op)
        finally:
            reporter.finish_uploads()  # under the heartbeat: the lease holds while the last upload runs
            clear_cached_checkpoints(store, job_id, keep=None)  # uploaded: the bucket has them, free the disk
        result = replace(result, checkpoint=reporter.stored_checkpoint(result.checkpoint))
    return _record_result(engine, lease, settings, result, stop, hb, reporter.checkpoint_error)


def _from_storage(engine: Engine, lease: Lease, hb: Heartbeat, retry_s: float, what: str, work: Callable[[], T]) -> T:
    """A starting job's input from the store, waiting out a bucket outage for up to `retry_s`.

    The wait ends at once when the lease is lost (LeaseLost), the worker shuts down (the job is handed
    back), or the job is cancelled or paused (it ends so): EndedBeforeStart. Past `retry_s` the
    StorageError fails the job, saying the storage could not be reached (describe_crash)."""
    def interrupted() -> bool:
        return hb.lost.is_set() or hb.cancel.is_set() or hb.pause.is_set() or SHUTDOWN.is_set()

    def nap(seconds: float) -> None:  # a backoff sleep that a cancel, pause or shutdown cuts short
        until = time.monotonic() + seconds
        while not interrupted() and (left := until - time.monotonic()) > 0:
            time.sleep(min(left, INTERRUPT_POLL_S))

    try:
        return with_storage_retry(work, deadline_s=retry_s, what=f"job {lease.job_id}: {what}",
                                  stop_waiting=interrupted, sleep=nap)
    except StorageError:
        _end_before_start(engine, lease, hb)
        raise


def _end_before_start(engine: Engine, lease: Lease, hb: Heartbeat) -> None:
    """End a job that waited for its inputs as the reason to stop says (raises); returns when none holds."""
    why = "while the storage was unreachable, before training started"
    if hb.lost.is_set():
        raise LeaseLost(lease.job_id)
    if hb.cancel.is_set() and finish_job(engine, lease, "cancelled", event=("cancelled", f"cancelled {why}")):
        raise EndedBeforeStart("cancelled")
    if hb.pause.is_set() and pause_held_job(engine, lease, None, f"paused {why}"):
        raise EndedBeforeStart("paused")
    if SHUTDOWN.is_set() and release_job(engine, lease, f"worker shutting down {why}; the job waits"):
        raise EndedBeforeStart("released")


def torch_device_type(device: str) -> str:
    """`cuda` for cuda:N, else the device name (a data-parallel job uses that type's devices 0..N-1)."""
    return device.split(":", 1)[0]


def collective_timeout_s(settings: WorkerSettings) -> float:
    """How long a rank waits in a collective before the job fails as hung. Rank 0 may spend up to
    db_retry_s in a database write (an outage) while the others wait for its next step."""
    return settings.db_retry_s + COLLECTIVE_MARGIN_S


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
    if result.status == "paused":
        return _record_pause(engine, lease, result, diagnosed)
    status, error = result.status, result.error
    missing = final_checkpoint_missing(result, checkpoint_error)
    if missing and find_resume_point(engine, job_id, settings.storage)[1] == result.step:
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
        elif SHUTDOWN.is_set() and pause_held_job(
                engine, lease, result.step, "worker shutting down while pausing; paused at its checkpoint",
                **diagnosed):
            return "paused"
    if not finish_job(engine, lease, status, error=error, **diagnosed):
        return "lost"
    return status


def _record_pause(engine: Engine, lease: Lease, result: Any, diagnosed: dict[str, Any]) -> str:
    """The run stopped at a checkpoint for a pause: the job becomes paused and this worker is free.

    A cancel that came in meanwhile (pausing -> cancelling) wins: the job ends cancelled at the
    checkpoint the run just wrote. Nothing leads from pausing back to running."""
    if pause_held_job(engine, lease, result.step, **diagnosed):
        return "paused"
    if finish_job(engine, lease, "cancelled", event=("cancelled", f"cancelled at step {result.step} while pausing"),
                  **diagnosed):
        return "cancelled"
    return "lost"


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


def sample_checkpoint(engine: Engine, store: Storage, job_id: str, step: int) -> Path | None:
    """A local copy of the recorded checkpoint, checked against the record's sha256 (fetched from a
    bucket into this host's cache); None when the record or a matching file is gone."""
    with engine.connect() as conn:
        sha = conn.execute(select(Checkpoint.sha256).where(Checkpoint.job_id == job_id, Checkpoint.step == step)
                           ).scalar_one_or_none()
    return None if sha is None else fetch_verified(store, checkpoint_key(job_id, step), sha)


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
        path = sample_checkpoint(engine, settings.storage, sample.job_id, sample.checkpoint_step)
        if path is None:
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
