"""Exports of a checkpoint (Hugging Face folder, weights-only safetensors), made by a worker.

The API never imports torch, so it cannot read a checkpoint: it asks a worker (task
`stabletrain.export` on the samples queue) to write the export into storage, next to nothing the
API owns, and serves the file once it is there. Markers beside the export's name keep the
exchange stateless: `.pending` (a request was sent; not re-sent within EXPORT_PENDING_S) and
`.error` (the worker's message, reported once, then cleared so a later request tries again).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flask import current_app
from flask_smorest import abort

from app.models import Checkpoint, Job
from app.services.queue import EXPORT_TASK, SAMPLE_QUEUE, publish
from app.services.storage import export_path
from stabletrain_export.rules import ERROR_SUFFIX, PENDING_SUFFIX, export_blocker

# A request whose worker has not answered within this long is sent again (the worker may have died).
EXPORT_PENDING_S = 120.0


def export_file_path(ckpt: Checkpoint, fmt: str) -> Path:
    """Where the worker writes (and the API finds) this checkpoint's export."""
    return export_path(ckpt.job_id, ckpt.step, ckpt.sha256, fmt)


def refuse_unmappable(job: Job, fmt: str) -> None:
    """409 naming the spec field that keeps this job from exporting as `fmt`."""
    blocker = export_blocker(job.spec or {}, fmt)
    if blocker:
        field, reason = blocker
        abort(409, message=f"Job {job.id} cannot be exported as {fmt}: {field}: {reason}.",
              details={field: [reason]})


def request_export(ckpt: Checkpoint, fmt: str) -> Path:
    """The export's path; asks a worker for it unless it exists or was asked for recently.

    A worker's failure is answered here as a 500 with its message, once.
    """
    path = export_file_path(ckpt, fmt)
    if path.is_file():
        return path
    report_failure(path)
    pending = path.with_name(path.name + PENDING_SUFFIX)
    if not _recent(pending):
        pending.parent.mkdir(parents=True, exist_ok=True)
        pending.touch()
        if not publish(EXPORT_TASK, ckpt.job_id, SAMPLE_QUEUE, (ckpt.step, ckpt.sha256, fmt)):
            pending.unlink(missing_ok=True)
            abort(503, message="The task queue is unavailable; try the export again shortly.")
    return path


def wait_for_export(path: Path, wait_s: float) -> bool:
    """Poll until the export (or the worker's failure) is there or wait_s passes; True: the file is."""
    error = _error_marker(path)
    deadline = time.monotonic() + wait_s
    while not (path.is_file() or error.is_file()) and time.monotonic() < deadline:
        time.sleep(float(current_app.config["SAMPLE_POLL_S"]))
    if path.is_file():
        return True
    report_failure(path)
    return False


def report_failure(path: Path) -> None:
    """500 with the worker's message when it failed to write `path` (cleared: the next request retries)."""
    error = _error_marker(path)
    if error.is_file():
        message = error.read_text(encoding="utf-8", errors="replace")[:2000]
        error.unlink(missing_ok=True)
        abort(500, message=f"The export failed: {message}", code="export_failed")


def _error_marker(path: Path) -> Path:
    return path.with_name(path.name + ERROR_SUFFIX)


def _recent(marker: Path) -> bool:
    try:
        return time.time() - os.stat(marker).st_mtime < EXPORT_PENDING_S
    except FileNotFoundError:
        return False
