"""File locations under STORAGE_DIR; paths are built only from server-made values."""

from __future__ import annotations

from pathlib import Path

from flask import current_app


def storage_dir() -> Path:
    """Root of the storage folder."""
    return Path(current_app.config["STORAGE_DIR"])


def dataset_path(sha256: str) -> Path:
    """Content-addressed dataset file."""
    return storage_dir() / "datasets" / f"{sha256}.txt"


def checkpoint_path(job_id: str, step: int) -> Path:
    """Checkpoint file of a job at a step."""
    return storage_dir() / "checkpoints" / job_id / f"step_{int(step)}.pt"


def tmp_dir() -> Path:
    """Scratch folder on the same filesystem (so rename is atomic)."""
    path = storage_dir() / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path
