"""Exports asked for by the API: read a checkpoint, write its export into storage.

No database: the API's request names the checkpoint (job, step, sha256) and polls storage for the
file. A failure leaves its message in an `.error` file beside the export's name for the API to
report; the `.pending` marker goes either way, so a later request asks again.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from stabletrain_export.rules import ERROR_SUFFIX, FORMATS, PENDING_SUFFIX, export_relpath
from worker.engine.checkpoint import checkpoint_path, file_sha256

log = logging.getLogger(__name__)

_STEP = re.compile(r"step_(\d+)-")


def run_export(storage: Path, job_id: str, step: int, sha256: str, fmt: str) -> str:
    """Write the export of one checkpoint (a no-op when it exists); returns the outcome."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}")
    out = storage / export_relpath(job_id, step, sha256, fmt)
    error = out.with_name(out.name + ERROR_SUFFIX)
    try:
        if out.is_file():
            return "exists"
        src = checkpoint_path(storage / "checkpoints" / job_id, step)
        if not src.is_file() or file_sha256(src) != sha256:
            raise FileNotFoundError(f"the checkpoint at step {step} is no longer stored as requested")
        from stabletrain_export.hf import write_hf_archive
        from stabletrain_export.weights import write_weights

        (write_hf_archive if fmt == "hf" else write_weights)(src, out)
        error.unlink(missing_ok=True)
        prune_orphans(storage, job_id)
        return "written"
    except Exception as exc:
        log.exception("export of %s step %s as %s failed", job_id, step, fmt)
        error.parent.mkdir(parents=True, exist_ok=True)
        error.write_text(f"{type(exc).__name__}: {exc}", encoding="utf-8")
        return "failed"
    finally:
        out.with_name(out.name + PENDING_SUFFIX).unlink(missing_ok=True)


def prune_orphans(storage: Path, job_id: str) -> None:
    """Remove the job's exports whose checkpoint file is gone (pruned by keep_last)."""
    ckpts = storage / "checkpoints" / job_id
    for path in (storage / "exports" / job_id).iterdir():
        match = _STEP.match(path.name)
        if not match:
            continue
        src = checkpoint_path(ckpts, int(match.group(1)))
        if not src.is_file():
            path.unlink(missing_ok=True)
