"""Weights-only files: the model's tensors in safetensors, the engine config in its metadata.

No optimizer, scheduler, RNG or rollback state: what sampling and exports need, nothing else. The
metadata carries the spec and the tokenizer state as JSON strings, so the file alone rebuilds the
model (`python -m worker.engine sample FILE.safetensors`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from worker.engine.checkpoint import load_checkpoint

WEIGHTS_FORMAT = "stabletrain-weights-v1"


class ExportError(ValueError):
    """A file that cannot be exported or read as a model (bad input, not a server fault)."""


def model_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model state without a torch.compile prefix, each tensor contiguous and unshared.

    safetensors refuses tensors that share memory (a tied head is the embedding itself); a
    clone per repeat keeps the file loadable by any reader at the cost of one extra table.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[key.removeprefix("_orig_mod.")] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def read_engine_state(path: Path) -> dict[str, Any]:
    """{spec, tokenizer, model} from a checkpoint (.pt) or a weights-only file (.safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_weights(path)
    ckpt = load_checkpoint(path)
    return {"spec": ckpt["spec"], "tokenizer": ckpt["tokenizer"], "model": model_tensors(ckpt["model"])}


def _read_weights(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("stabletrain_format") != WEIGHTS_FORMAT:
                raise ExportError(f"{path.name} is not a StableTrain weights file")
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (no iterator)
        return {"spec": json.loads(meta["spec"]), "tokenizer": json.loads(meta["tokenizer"]), "model": tensors}
    except ExportError:
        raise
    except Exception as exc:  # OSError, bad JSON, or safetensors' own SafetensorError for a damaged file
        raise ExportError(f"cannot read {path.name}: {exc}") from exc


def write_weights(src: Path, dst: Path) -> Path:
    """Weights-only safetensors of a checkpoint (or of another weights file), written atomically."""
    state = read_engine_state(src)
    metadata = {
        "format": "pt",  # what safetensors' own readers expect for torch tensors
        "stabletrain_format": WEIGHTS_FORMAT,
        "spec": json.dumps(state["spec"], sort_keys=True),
        "tokenizer": json.dumps(state["tokenizer"], sort_keys=True),
    }
    with atomic_path(Path(dst)) as tmp:
        save_file(model_tensors(state["model"]), str(tmp), metadata=metadata)
    return Path(dst)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary name beside `final`, renamed onto it when the block succeeds, removed if not."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
