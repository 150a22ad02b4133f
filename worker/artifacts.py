"""A training run's files and the shared store: checkpoint uploads in the background, tokenizer caches.

With a folder store the trainer writes checkpoints straight into it and nothing here moves bytes. With a
bucket the trainer writes into this host's cache folder as usual; `CheckpointUploads` then uploads each
file on a background thread (training goes on meanwhile) and writes its record only once the object is
complete, so a record always names a stored object and a failed upload leaves no record.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from stabletrain_storage import Storage, StorageError, checkpoint_key, checkpoint_prefix, checkpoint_step
from worker.backoff import retry_with_backoff

log = logging.getLogger(__name__)

TOKENIZERS = "tokenizers/"
TOKENS = "tokens/"

T = TypeVar("T")


def with_storage_retry(work: Callable[[], T], *, deadline_s: float, what: str,
                       stop_waiting: Callable[[], bool] = lambda: False, sleep: Callable[[float], None] = time.sleep,
                       first_delay_s: float = 0.5, max_delay_s: float = 15.0) -> T:
    """Run `work`, retrying while the bucket cannot be reached (StorageError) with backoff for `deadline_s`.

    A bucket outage (endpoint restarting, a network blip) must not fail a job that has not started:
    the job waits as it does for a database outage (worker.db.with_retry, the same loop). A missing
    object is no outage (FileNotFoundError passes at once). `stop_waiting` (the lease lost, a shutdown)
    ends the wait early with the last error."""
    return retry_with_backoff(
        work, retryable=lambda exc: isinstance(exc, StorageError),
        describe=lambda exc: f"{what}: the storage cannot be reached ({exc})", deadline_s=deadline_s,
        first_delay_s=first_delay_s, max_delay_s=max_delay_s, sleep=sleep, stop_waiting=stop_waiting)


class CheckpointRecords(Protocol):
    """What the uploads report to (worker.reporting.DbReporter)."""

    def write_checkpoint_record(self, record: dict[str, Any]) -> None: ...
    def remove_checkpoint_record(self, step: int) -> None: ...
    def may_write_checkpoints(self) -> bool: ...
    def on_event(self, event: dict[str, Any]) -> None: ...


class CheckpointUploads:
    """Uploads of one run's checkpoints, one at a time and in the order written, on a worker thread.

    Removals (keep_last) queue behind the uploads, so a removal never overtakes the upload and record of
    its own checkpoint. After each upload the bucket is pruned to the newest `keep_last`, which also clears
    what an earlier attempt on another host left there."""

    def __init__(self, store: Storage, job_id: str, keep_last: int, records: CheckpointRecords) -> None:
        self.store = store
        self.job_id = job_id
        self.keep_last = max(1, int(keep_last))
        self.records = records
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"upload-{job_id}")
        self._pending: list[Future[None]] = []
        self.stored: dict[str, Any] | None = None  # the newest record written
        self.failed_steps: set[int] = set()

    def submit(self, path: Path, record: dict[str, Any]) -> None:
        """Queue the upload of a complete checkpoint file; its record follows the upload."""
        staged = _stage(path)  # keep_last may unlink the file before the upload has read it
        self._pending.append(self._pool.submit(self._upload, staged, record))

    def remove(self, step: int) -> None:
        """Queue the removal of a pruned checkpoint: its record first, then its object."""
        self._pending.append(self._pool.submit(self._remove, step))

    def wait(self) -> None:
        """Block until every queued upload and removal has finished (the job's final state waits here)."""
        while self._pending:
            self._pending.pop(0).result()

    def close(self) -> None:
        """Wait for what is queued, then stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def _upload(self, staged: Path, record: dict[str, Any]) -> None:
        step = int(record["step"])
        try:
            if not self.records.may_write_checkpoints():
                log.info("job %s: checkpoint %s not uploaded, the lease is lost", self.job_id, step)
                return
            self.store.put_file(staged, checkpoint_key(self.job_id, step))
        except Exception as exc:
            self.failed_steps.add(step)
            log.warning("job %s: upload of checkpoint %s failed: %s", self.job_id, step, exc)
            self.records.on_event({"step": step, "kind": "checkpoint_failed",
                                   "message": f"checkpoint at step {step} not stored: upload failed: {exc}",
                                   "data": {"previous": self.stored and self.stored["step"]}})
            return
        finally:
            staged.unlink(missing_ok=True)
        self.records.write_checkpoint_record(record)  # upload first, then record
        self.stored = record
        self._prune()

    def _remove(self, step: int) -> None:
        try:
            if not self.records.may_write_checkpoints():
                return  # the job's objects belong to the worker that holds it now
            self.records.remove_checkpoint_record(step)  # record first: a listed checkpoint has its object
            self.store.delete(checkpoint_key(self.job_id, step))
        except Exception as exc:  # left over: the next prune after an upload removes it
            log.warning("job %s: removal of checkpoint %s failed: %s", self.job_id, step, exc)

    def _prune(self) -> None:
        try:
            keys = self.store.list(checkpoint_prefix(self.job_id))
        except Exception as exc:
            log.warning("job %s: listing checkpoints to prune failed: %s", self.job_id, exc)
            return
        steps = sorted(s for s in (checkpoint_step(k) for k in keys) if s is not None)
        for step in steps[:-self.keep_last]:
            self._remove(step)


def _stage(path: Path) -> Path:
    """A second name for the file (a dot name, which the trainer's pruning does not see)."""
    staged = path.with_name(f".upload-{path.name}.{uuid.uuid4().hex}")
    try:
        os.link(path, staged)
    except OSError:
        shutil.copyfile(path, staged)
    return staged


def local_checkpoint_dir(store: Storage, job_id: str) -> Path:
    """Where the trainer writes the job's checkpoints on this host: the store's folder, or the cache."""
    return store.local_dir(checkpoint_prefix(job_id))


def clear_cached_checkpoints(store: Storage, job_id: str, keep: Path | None) -> None:
    """Drop this host's cached checkpoint files of the job (but `keep`, the one resumed from): the bucket
    is the truth, and stale copies from an earlier attempt here would take part in the trainer's
    keep_last. A folder store keeps its files: they are the store."""
    if not store.is_remote:
        return
    for path in local_checkpoint_dir(store, job_id).glob("step_*.pt"):
        if keep is None or path != keep:
            path.unlink(missing_ok=True)


def _dataset_caches(sha256: str) -> tuple[tuple[str, str], ...]:
    """(folder, name prefix) of what workers derive from one dataset file: its BPE tokenizers
    (`bpe-<sha256>-<vocab>-<recipe>.json`, worker/engine/tokenizers.py) and its token files with their
    sidecars (`<sha256>-<kind>-<tokenizer key>.u16`, worker/engine/corpus.py). Temp files start with a dot."""
    return ((TOKENIZERS, f"bpe-{sha256}-"), (TOKENS, f"{sha256}-"))


def pull_dataset_caches(store: Storage, sha256: str) -> None:
    """Fetch the bucket's tokenizers and token files of this dataset into this host's cache folders."""
    if not store.is_remote:
        return
    try:
        for folder, prefix in _dataset_caches(sha256):
            for key in store.list(folder + prefix):
                store.local_copy(key)
    except StorageError as exc:  # a cache only: without it the engine tokenizes (and trains a BPE) again
        log.warning("dataset caches not fetched from storage: %s", exc)


def push_dataset_caches(store: Storage, sha256: str) -> None:
    """Upload the tokenizers and token files of this dataset that this host made and the bucket lacks.
    A token file whose sidecar disagrees after a racing upload is rebuilt by the engine (corpus.py)."""
    if not store.is_remote:
        return
    try:
        for folder, prefix in _dataset_caches(sha256):
            for path in sorted(store.local_dir(folder).glob(prefix + "*")):
                key = folder + path.name
                if not store.exists(key):
                    store.put_file(path, key)
    except StorageError as exc:  # a cache only: the next job of this dataset makes them again
        log.warning("dataset caches not stored: %s", exc)
