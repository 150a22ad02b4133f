"""Exports of a checkpoint (Hugging Face folder, weights-only safetensors), made by a worker.

The API never imports torch, so it cannot read a checkpoint: it asks a worker (task
`stabletrain.export` on the samples queue) to write the export into storage, next to nothing the
API owns, and serves the file once it is there. Markers beside the export's name keep the
exchange stateless: `.pending` (a request was sent; not re-sent within EXPORT_PENDING_S) and
`.error` (the worker's message, reported once, then cleared so a later request tries again).
"""

from __future__ import annotations

import time

from flask import current_app
from flask_smorest import abort

from app.models import Checkpoint, Job
from app.services.queue import EXPORT_TASK, SAMPLE_QUEUE, publish
from app.services.storage import export_key, storage
from stabletrain_export.rules import ERROR_SUFFIX, PENDING_SUFFIX, export_blocker

# A request whose worker has not answered within this long is sent again (the worker may have died).
EXPORT_PENDING_S = 120.0


def export_file_key(ckpt: Checkpoint, fmt: str) -> str:
    """Where the worker stores (and the API finds) this checkpoint's export."""
    return export_key(ckpt.job_id, ckpt.step, ckpt.sha256, fmt)


def refuse_unmappable(job: Job, fmt: str) -> None:
    """409 naming the spec field that keeps this job from exporting as `fmt`."""
    blocker = export_blocker(job.spec or {}, fmt)
    if blocker:
        field, reason = blocker
        abort(409, message=f"Job {job.id} cannot be exported as {fmt}: {field}: {reason}.",
              details={field: [reason]})


def request_export(ckpt: Checkpoint, fmt: str) -> str:
    """The export's key; asks a worker for it unless it exists or was asked for recently.

    A worker's failure is answered here as a 500 with its message, once.
    """
    key = export_file_key(ckpt, fmt)
    store = storage()
    if store.exists(key):
        return key
    report_failure(key)
    pending = key + PENDING_SUFFIX
    if not _recent(pending):
        store.put_bytes(b"", pending)
        if not publish(EXPORT_TASK, ckpt.job_id, SAMPLE_QUEUE, (ckpt.step, ckpt.sha256, fmt)):
            store.delete(pending)
            abort(503, message="The task queue is unavailable; try the export again shortly.")
    return key


def wait_for_export(key: str, wait_s: float) -> bool:
    """Poll until the export (or the worker's failure) is there or wait_s passes; True: the file is."""
    store = storage()
    error = key + ERROR_SUFFIX
    deadline = time.monotonic() + wait_s
    while not (store.exists(key) or store.exists(error)) and time.monotonic() < deadline:
        time.sleep(float(current_app.config["SAMPLE_POLL_S"]))
    if store.exists(key):
        return True
    report_failure(key)
    return False


def report_failure(key: str) -> None:
    """500 with the worker's message when it failed to store `key` (cleared: the next request retries)."""
    store = storage()
    try:
        message = store.read_bytes(key + ERROR_SUFFIX).decode("utf-8", errors="replace")[:2000]
    except FileNotFoundError:
        return
    store.delete(key + ERROR_SUFFIX)
    abort(500, message=f"The export failed: {message}", code="export_failed")


def _recent(marker: str) -> bool:
    info = storage().stat(marker)
    # the store's clock (a bucket's Last-Modified) against ours: a skew only shifts when a request is re-sent
    return info is not None and time.time() - info.modified < EXPORT_PENDING_S
