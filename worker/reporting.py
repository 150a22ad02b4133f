"""Engine callbacks -> database records, idempotently and through database restarts.

Every write is an upsert keyed like the records' primary keys, so a batch sent
twice, or a resumed run re-sending the steps after its checkpoint, leaves one
row per step. Writes are retried with backoff (PostgreSQL restart) instead of
failing the job; only after `retry_s` does the error reach the task.

Every write is fenced in the database: its transaction first locks the job row with
the worker's lease token (`worker.leases.hold`) and writes nothing when another worker
has claimed the job since, however late a retried write arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, delete, select, update
from sqlalchemy.exc import DBAPIError

from app.models import ActivationMetric, Checkpoint, Event, Job, LayerMetric, StepMetric
from app.services.common import finite_or_none, without_nonfinite
from app.services.webhook_events import record_health_changes, record_job_event
from stabletrain_storage import Storage
from worker.artifacts import CheckpointUploads
from worker.db import upsert, utcnow, with_retry
from worker.engine.diagnosis import health_of
from worker.engine.trainer import Callbacks
from worker.leases import Lease, hold, still_held

log = logging.getLogger(__name__)

STEP_COLUMNS = tuple(c.name for c in StepMetric.__table__.columns if c.name != "job_id")
LAYER_COLUMNS = ("layer", "grad_norm", "weight_norm", "update_ratio")
ACTIVATION_FLOATS = ("mean", "std", "saturated_frac", "dead_frac", "attn_max_logit", "attn_entropy", "z_lse",
                     "grad_time_ratio")


def diagnosis_values(findings: list[dict[str, Any]], summary: str) -> dict[str, Any]:
    """Job columns for a diagnosis: the record itself and the one health it implies (worst severity)."""
    return {"diagnosis": without_nonfinite({"findings": findings, "summary": summary}), "health": health_of(findings)}


def step_record(job_id: str, row: dict[str, Any]) -> dict[str, Any]:
    """One step_metrics row from an engine step row (unknown keys dropped, all columns present)."""
    record = {c: row.get(c) for c in STEP_COLUMNS}
    record["job_id"] = job_id
    for flag in ("clipped", "nonfinite", "skipped"):
        record[flag] = bool(record[flag])
    return record


def layer_record(job_id: str, step: int, row: dict[str, Any], position: int) -> dict[str, Any]:
    """One layer_metrics row from an engine layer row; `position` is the row's index in the engine's list,
    which is depth order (`model.layer_names()`: embedding first, head last)."""
    return {"job_id": job_id, "step": step, **{c: row.get(c) for c in LAYER_COLUMNS}, "position": position}


def _float_or_none(value: Any) -> float | None:
    """A finite float, or None for a missing or NaN/inf value (JSON and the API have no NaN)."""
    return None if value is None else finite_or_none(float(value))


def activation_record(job_id: str, step: int, row: dict[str, Any], position: int) -> dict[str, Any]:
    """One activation_metrics row from an engine activation row (docs/contracts.md); `position` is the row's
    index in the engine's list (depth order). Non-finite numbers become null, unknown keys are dropped."""
    grad_time = row.get("grad_time")
    return {"job_id": job_id, "step": step, "site": str(row["site"]), "position": position,
            "kind": str(row.get("kind") or ""), **{c: _float_or_none(row.get(c)) for c in ACTIVATION_FLOATS},
            "grad_time": None if grad_time is None else without_nonfinite([[int(t), float(v)] for t, v in grad_time])}


class DbReporter(Callbacks):
    """Writes what the Trainer reports into the job's records."""

    def __init__(
        self,
        engine: Engine,
        job_id: str,
        *,
        retry_s: float = 300.0,
        stop: Callable[[], bool] = lambda: False,
        pause: Callable[[], bool] = lambda: False,
        fenced: Callable[[], bool] = lambda: False,
        lease: Lease | None = None,
        on_lease_lost: Callable[[], None] = lambda: None,
        store: Storage | None = None,
        keep_last: int = 1,
    ) -> None:
        self.engine = engine
        self.job_id = job_id
        self.retry_s = retry_s
        self._stop = stop
        self._pause = pause
        # True once another worker owns the job: then our writes would fight theirs
        self._fenced = fenced
        # the claim's token: every write's transaction must still find it on the job (None: unfenced, tests)
        self.lease = lease
        self._on_lease_lost = on_lease_lost
        # message of the last checkpoint the engine could not write (storage full, read-only, ...)
        self.checkpoint_error: str | None = None
        # a bucket: checkpoint files go up in the background and are recorded after (None: a folder store,
        # where the trainer's file is already in place and is recorded at once)
        self.uploads = CheckpointUploads(store, job_id, keep_last, self) if store is not None and store.is_remote \
            else None

    def _write(self, what: str, work: Callable[[Connection], None]) -> None:
        def fenced_work(conn: Connection) -> None:
            # checked on every try: a write held up by an outage may outlive the lease
            if self._fenced():
                log.info("job %s: dropping %s write, lease lost", self.job_id, what)
                return
            if self.lease is not None and not hold(conn, self.lease):
                log.warning("job %s: dropping %s write, another worker holds the job now", self.job_id, what)
                self._on_lease_lost()
                return
            work(conn)

        with_retry(self.engine, fenced_work, deadline_s=self.retry_s, what=f"{what} of {self.job_id}")

    def on_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Upsert a batch of step rows and move the job's progress to the last one."""
        if not rows:
            return
        records = [step_record(self.job_id, r) for r in rows]
        last = rows[-1]
        # job.health follows the diagnosis only (on_diagnosis): the engine's per-step health state is
        # left out of `latest` too, so every reader sees one health
        latest = without_nonfinite({k: v for k, v in last.items() if k != "health"})
        progress: dict[str, Any] = {"step": int(last["step"]), "latest": latest, "updated_at": utcnow()}
        if last.get("tokens_seen") is not None:
            progress["tokens_seen"] = int(last["tokens_seen"])

        def work(conn: Connection) -> None:
            upsert(conn, StepMetric.__table__, records, ("job_id", "step"))
            conn.execute(update(Job).where(Job.id == self.job_id).values(**progress))

        self._write("metrics", work)

    def on_layer_stats(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Upsert the per-layer rows of one step, each with its depth position (its index in `rows`)."""
        records = [layer_record(self.job_id, step, r, i) for i, r in enumerate(rows)]
        self._write("layer stats", lambda conn: upsert(conn, LayerMetric.__table__, records, ("job_id", "step", "layer")))

    def on_activation_stats(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Upsert the activation rows of one step, each with its depth position (its index in `rows`)."""
        records = [activation_record(self.job_id, step, r, i) for i, r in enumerate(rows)]
        self._write("activation stats",
                    lambda conn: upsert(conn, ActivationMetric.__table__, records, ("job_id", "step", "site")))

    def on_event(self, event: dict[str, Any]) -> None:
        """Append one event."""
        if event.get("kind") == "checkpoint_failed":
            self.checkpoint_error = str(event.get("message") or "checkpoint not written")
        record = {
            "job_id": self.job_id,
            "step": event.get("step"),
            "kind": str(event.get("kind", "event")),
            "message": str(event.get("message") or ""),
            "data": without_nonfinite(event.get("data")),
            "created_at": utcnow(),
        }
        self._write("event", lambda conn: conn.execute(Event.__table__.insert().values(**record)))

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        """Record a checkpoint whose file is fully written (upsert: a resumed run may rewrite it); with a
        bucket, after its background upload finished."""
        path = Path(info["path"])
        if not path.is_file():
            log.warning("job %s: checkpoint %s reported but missing; not recorded", self.job_id, path)
            return
        record = {
            "job_id": self.job_id,
            "step": int(info["step"]),
            "bytes": int(info["bytes"]),
            "sha256": str(info["sha256"]),
            "val_loss": None if info.get("val_loss") is None else finite_or_none(float(info["val_loss"])),
            "health": info.get("health"),
            "created_at": utcnow(),
        }
        if self.uploads is not None:
            self.uploads.submit(path, record)
            return
        self.write_checkpoint_record(record)

    def write_checkpoint_record(self, record: dict[str, Any]) -> None:
        """Upsert one checkpoint record (its file or object is complete) and its checkpoint.created event."""
        event = {k: record[k] for k in ("step", "bytes", "sha256", "val_loss", "health")}

        def work(conn: Connection) -> None:
            upsert(conn, Checkpoint.__table__, [record], ("job_id", "step"))
            record_job_event(conn, self.job_id, "checkpoint.created", {"checkpoint": event})

        self._write("checkpoint", work)

    def on_checkpoint_removed(self, info: dict[str, Any]) -> None:
        """Delete the record of a checkpoint file that keep_last pruned (with a bucket, queued behind the
        uploads, and the object goes too)."""
        if self.uploads is not None:
            self.uploads.remove(int(info["step"]))
            return
        self.remove_checkpoint_record(int(info["step"]))

    def remove_checkpoint_record(self, step: int) -> None:
        """Delete one checkpoint record."""
        stmt = delete(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.step == step)
        self._write("checkpoint removal", lambda conn: conn.execute(stmt))

    def finish_uploads(self) -> None:
        """Wait for the background uploads (the job's final state is written after them)."""
        if self.uploads is not None:
            self.uploads.close()

    def stored_checkpoint(self, reported: dict[str, Any] | None) -> dict[str, Any] | None:
        """The engine's last checkpoint if it is stored, else the newest one that is (its upload failed)."""
        if self.uploads is None or reported is None or int(reported["step"]) not in self.uploads.failed_steps:
            return reported
        return self.uploads.stored

    def on_diagnosis(self, findings: list[dict[str, Any]], summary: str) -> None:
        """Keep a running job's diagnosis and health current (the final ones are written with the result)."""
        values = diagnosis_values(findings, summary)
        stmt = update(Job).where(Job.id == self.job_id).values(**values)

        def work(conn: Connection) -> None:
            old = conn.execute(select(Job.diagnosis).where(Job.id == self.job_id)).scalar_one_or_none()
            conn.execute(stmt)
            record_health_changes(conn, self.job_id, old, values["diagnosis"])  # job.health_changed

        self._write("diagnosis", work)

    def may_write_checkpoints(self) -> bool:
        """Once another worker owns the job, its checkpoint folder is theirs: write and prune nothing."""
        if self._fenced():
            return False
        if self.lease is None:
            return True
        try:
            return still_held(self.engine, self.lease)
        except DBAPIError:  # database down: the in-memory fence decides; the record's write is fenced anyway
            return True

    def should_stop(self) -> bool:
        """Cancel, time limit, shutdown or lost lease: all in-memory flags."""
        return self._stop()

    def should_pause(self) -> bool:
        """The job is `pausing` (the heartbeat's in-memory flag)."""
        return self._pause()
