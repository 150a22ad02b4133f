"""Exports asked for by the API: read a checkpoint, write its export into storage.

No database: the API's request names the checkpoint (job, step, sha256) and polls storage for the
object. A failure leaves its message in an `.error` object beside the export's key for the API to
report; the `.pending` marker goes either way, so a later request asks again. The checkpoint is read
from a local copy (fetched from a bucket into this host's cache, checked against the sha256), and the
export is written to a local temp file, then put into the store whole.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

from stabletrain_export.rules import ERROR_SUFFIX, FORMATS, PENDING_SUFFIX, SUFFIXES, export_relpath
from stabletrain_storage import Storage, checkpoint_key, fetch_verified

log = logging.getLogger(__name__)

_STEP = re.compile(r"step_(\d+)-")


def run_export(store: Storage, job_id: str, step: int, sha256: str, fmt: str) -> str:
    """Write the export of one checkpoint (a no-op when it exists); returns the outcome."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}")
    key = export_relpath(job_id, step, sha256, fmt)
    try:
        if store.exists(key):
            return "exists"
        src = fetch_verified(store, checkpoint_key(job_id, step), sha256)
        if src is None:
            raise FileNotFoundError(f"the checkpoint at step {step} is no longer stored as requested")
        with tempfile.TemporaryDirectory(prefix="export-", dir=store.scratch_dir()) as tmp:
            out = _write_export(src, Path(tmp) / f"export{SUFFIXES[fmt]}", fmt)
            store.put_file(out, key)
        store.delete(key + ERROR_SUFFIX)
        prune_orphans(store, job_id)
        return "written"
    except Exception as exc:
        log.exception("export of %s step %s as %s failed", job_id, step, fmt)
        store.put_bytes(f"{type(exc).__name__}: {exc}".encode(), key + ERROR_SUFFIX)
        return "failed"
    finally:
        store.delete(key + PENDING_SUFFIX)


def _write_export(src: Path, out: Path, fmt: str) -> Path:
    from stabletrain_export.hf import write_hf_archive
    from stabletrain_export.weights import write_weights

    (write_hf_archive if fmt == "hf" else write_weights)(src, out)
    return out


def prune_orphans(store: Storage, job_id: str) -> None:
    """Remove the job's exports whose checkpoint is gone (pruned by keep_last)."""
    for key in store.list(f"exports/{job_id}/"):
        match = _STEP.match(key.rsplit("/", 1)[-1])
        if match and not store.exists(checkpoint_key(job_id, int(match.group(1)))):
            store.delete(key)
