"""File locations under STORAGE_DIR; paths are built only from server-made values.

The builders refuse anything else (a ValueError, so a 500 rather than a file outside storage): a
dataset file is named by the sha256 the server computed, a checkpoint by a job id the server made and
an int step. Request values never get here unchecked (see services.common.get_owned).
"""

from __future__ import annotations

import re
from pathlib import Path

from flask import current_app

from app.models import is_server_id
from stabletrain_export.rules import FORMATS, export_relpath

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def storage_dir() -> Path:
    """Root of the storage folder."""
    return Path(current_app.config["STORAGE_DIR"])


def dataset_path(sha256: str) -> Path:
    """Content-addressed dataset file."""
    if not (isinstance(sha256, str) and SHA256_HEX.fullmatch(sha256)):
        raise ValueError(f"not a sha256 hex digest: {sha256!r:.80}")
    return storage_dir() / "datasets" / f"{sha256}.txt"


def token_files(sha256: str) -> list[Path]:
    """The worker's tokenized copies of a dataset file (`tokens/<sha256>-<tokenizer>.u16` and sidecars)."""
    dataset_path(sha256)  # the same check on the digest
    folder = storage_dir() / "tokens"
    return sorted(folder.glob(f"{sha256}-*")) if folder.is_dir() else []


def checkpoint_path(job_id: str, step: int) -> Path:
    """Checkpoint file of a job at a step."""
    if not is_server_id(job_id, "job") or isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"not a server-made job id and step: {job_id!r:.80}, {step!r:.20}")
    return storage_dir() / "checkpoints" / job_id / f"step_{int(step)}.pt"


def export_path(job_id: str, step: int, sha256: str, fmt: str) -> Path:
    """A checkpoint's export (named by the record's sha256; fmt one of the known formats)."""
    if not (isinstance(sha256, str) and SHA256_HEX.fullmatch(sha256)) or fmt not in FORMATS:
        raise ValueError(f"not a sha256 hex digest and export format: {sha256!r:.80}, {fmt!r:.20}")
    checkpoint_path(job_id, step)  # the same checks on the job id and step
    return storage_dir() / export_relpath(job_id, step, sha256, fmt)


def tmp_dir() -> Path:
    """Scratch folder on the same filesystem (so rename is atomic)."""
    path = storage_dir() / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path
