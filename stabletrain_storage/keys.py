"""Object keys of the storage layout (relative paths; the same in a folder and in a bucket)."""

from __future__ import annotations

import re

_STEP_NAME = re.compile(r"step_(\d+)\.pt")


def dataset_key(sha256: str) -> str:
    """Content-addressed dataset file."""
    return f"datasets/{sha256}.txt"


def checkpoint_prefix(job_id: str) -> str:
    """Folder of a job's checkpoints (with the trailing slash, so a listing matches no other job)."""
    return f"checkpoints/{job_id}/"


def checkpoint_key(job_id: str, step: int) -> str:
    """Checkpoint of a job at a step."""
    return f"{checkpoint_prefix(job_id)}step_{int(step)}.pt"


def checkpoint_step(key_or_name: str) -> int | None:
    """The step of a checkpoint key or file name (`.../step_12.pt` -> 12), None for anything else."""
    match = _STEP_NAME.fullmatch(key_or_name.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None
