"""Checkpoint files: written atomically, identified by sha256, loadable safely.

A checkpoint is a plain dict of tensors, numbers, strings and lists so that
`torch.load(path, weights_only=True)` reads it without executing code.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "stabletrain-ckpt-v1"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Write `state` to `path` via temp file + fsync + rename; return bytes and sha256.

    A reader never sees a partial file: the final name appears only once the
    whole content is on disk.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    payload = buffer.getbuffer()
    digest = hashlib.sha256(payload).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(payload)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return {"bytes": len(payload), "sha256": digest}


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with weights_only=True; reject foreign files."""
    try:
        state = torch.load(Path(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several kinds for corrupt files
        raise CheckpointError(f"cannot read checkpoint {Path(path).name}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{Path(path).name} is not a StableTrain checkpoint")
    return state


def checkpoint_path(out_dir: Path, step: int) -> Path:
    """Canonical file name of the checkpoint at `step`."""
    return Path(out_dir) / f"step_{step}.pt"
