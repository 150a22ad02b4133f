"""Rows for worker tests: an owner, a dataset and a job, inserted directly."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert

from app.models import ApiKey, Dataset, Job, new_id
from worker.db import utcnow

TINY_SPEC: dict[str, Any] = {
    "name": "tiny",
    "model": {"arch": "lstm", "n_layers": 1, "d_model": 16, "hidden": 16},
    "training": {"max_steps": 12, "batch_size": 4, "seq_len": 16, "eval_every": 6},
    "monitoring": {"layer_stats_every": 3},
    "checkpointing": {"every_steps": 5, "keep_last": 2},
}

CORPUS = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n" for i in range(300))


def make_job(engine: Engine, storage: Path | None = None, spec: dict[str, Any] | None = None,
             corpus: str = CORPUS, **values: Any) -> str:
    """Insert an owner, a dataset (file written when `storage` is given) and a job; return the job id."""
    spec = spec or TINY_SPEC
    key_id, ds_id, job_id = new_id("key"), new_id("ds"), new_id("job")
    sha = hashlib.sha256(corpus.encode()).hexdigest()
    if storage is not None:
        (storage / "datasets").mkdir(parents=True, exist_ok=True)
        (storage / "datasets" / f"{sha}.txt").write_text(corpus, encoding="utf-8")
    row = {"id": job_id, "owner_id": key_id, "dataset_id": ds_id, "name": spec.get("name", "job"), "spec": spec,
           "status": "queued", "created_at": utcnow(), "updated_at": utcnow(), "step": 0, "tokens_seen": 0,
           "max_steps": spec["training"]["max_steps"], "health": "ok", "attempts": 0, "cancel_requested": False}
    row.update(values)
    with engine.begin() as conn:
        conn.execute(insert(ApiKey).values(id=key_id, name="t", key_hash=key_id.ljust(64, "0"), prefix="st_",
                                           created_at=utcnow()))
        conn.execute(insert(Dataset).values(id=ds_id, owner_id=key_id, name="corpus", bytes=len(corpus.encode()), sha256=sha,
                                            created_at=utcnow()))
        conn.execute(insert(Job).values(**row))
    return job_id
