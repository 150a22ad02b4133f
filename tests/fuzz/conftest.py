"""Fixtures for API fuzzing: one seeded app (temp SQLite) with a key, a dataset, a running job and a
finished job with metrics, layers, events, a checkpoint (with its file), a diagnosis and a sample, so
generated requests sometimes name real ids and reach the handlers' deeper paths."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from app import create_app
from app.extensions import db
from app.models import Checkpoint, Event, Job, LayerMetric, Probe, Sample, StepMetric, utcnow
from tests.conftest import create_database, drop_database, postgres_base_url

CORPUS = ("the quick brown fox jumps over the lazy dog. " * 400).encode()  # 18,000 bytes
CHECKPOINT = bytes(range(256)) * 8  # the finished job's step-100 checkpoint file (2,048 bytes)


@dataclass
class Seeded:
    """The seeded app, its key and the ids of the records made for it."""

    app: Flask
    auth: dict[str, str]
    ids: dict[str, list[str]] = field(default_factory=dict)
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


def seed_app(tmp: Path, **overrides: Any) -> Seeded:
    """Build and fill the app (also used by tests/fuzz/run_fuzz.py)."""
    config: dict[str, Any] = {
        "TESTING": True,
        "DATABASE_URL": f"sqlite:///{tmp / 'fuzz.db'}",
        "BROKER_URL": f"sqlalchemy+sqlite:///{tmp / 'broker.db'}",
        "STORAGE_DIR": str(tmp / "storage"),
        "RATELIMIT_STORAGE_URI": "memory://",
        "RATELIMIT_DEFAULT": "1000000/minute",  # the limiter still runs on every request
        "RATELIMIT_UNAUTHENTICATED": "1000000/minute",  # the URL-map walks send thousands of bad keys
        "MAX_LIVE_JOBS": 1_000_000,
        "MAX_WEBHOOKS_PER_KEY": 1_000_000,
        "SAMPLE_POLL_S": 0.01,
        "LOG_LEVEL": "ERROR",
    }
    config.update(overrides)
    app = create_app(config)
    with app.app_context():
        db.create_all()
    result = app.test_cli_runner().invoke(args=["keys", "create", "fuzz"])
    assert result.exit_code == 0, result.output
    secret = dict(line.split(": ", 1) for line in result.output.strip().splitlines())["key"]
    auth = {"Authorization": f"Bearer {secret}"}
    client = app.test_client()
    ds = client.post("/v1/datasets?name=fuzz", data=CORPUS, headers={**auth, "Content-Type": "text/plain"})
    assert ds.status_code == 201, ds.json
    spec = {"dataset_id": ds.json["id"], "training": {"max_steps": 100, "seq_len": 16}}
    running = client.post("/v1/jobs", json=spec, headers=auth).json["id"]
    finished = client.post("/v1/jobs", json=spec, headers=auth).json["id"]
    payload = CHECKPOINT
    path = Path(app.config["STORAGE_DIR"]) / "checkpoints" / finished / "step_100.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    with app.app_context():
        # running: cancel makes it `cancelling` (still live), so DELETE of the dataset stays 409
        db.session.get(Job, running).status = "running"
        done = db.session.get(Job, finished)
        done.status, done.step, done.finished_at = "succeeded", 100, utcnow()
        done.diagnosis = {"findings": [{"kind": "exploding_gradients", "summary": "spikes"}], "summary": "spikes"}
        for step in range(1, 101):
            bad = step == 50
            db.session.add(StepMetric(job_id=finished, step=step, loss=math.nan if bad else 3.0 / step,
                                      lr=1e-3, grad_norm=math.inf if bad else 1.0, grad_norm_clipped=1.0,
                                      clipped=False, nonfinite=bad, skipped=bad, tokens_seen=step * 256,
                                      time=1.7e9 + step))
            if step % 10 == 0:
                for layer in ("embed.weight", "layers.0.weight", "head.weight"):
                    db.session.add(LayerMetric(job_id=finished, step=step, layer=layer, grad_norm=0.5,
                                               weight_norm=2.0, update_ratio=1e-3))
        for kind in ("started", "clip_burst", "checkpoint", "finished"):
            db.session.add(Event(job_id=finished, step=100, kind=kind, message=kind, data={"k": 1}))
        db.session.add(Checkpoint(job_id=finished, step=100, bytes=len(payload),
                                  sha256=hashlib.sha256(payload).hexdigest(), val_loss=1.5, health="ok"))
        owner = done.owner_id
        db.session.commit()
        sample = Sample(job_id=finished, owner_id=owner, checkpoint_step=100, prompt="The ", params={},
                        status="succeeded", text="The end", finished_at=utcnow())
        probe = Probe(job_id=finished, owner_id=owner, params={"lr_min": 1e-7, "lr_max": 10.0, "steps": 200},
                      status="succeeded", result={"steps_run": 0, "curve": [], "recommended": None},
                      finished_at=utcnow())
        db.session.add_all([sample, probe])
        db.session.commit()
        sample_id, probe_id = sample.id, probe.id
    webhook = client.post("/v1/webhooks", json={"url": "https://93.184.215.14/hook", "events": ["job.failed"]},
                          headers=auth)
    assert webhook.status_code == 201, webhook.json
    ids = {"job_id": [finished, running], "dataset_id": [ds.json["id"]], "step": ["100"],
           "sample_id": [sample_id], "probe_id": [probe_id],
           "webhook_id": [webhook.json["id"]]}  # the finished job comes first
    return Seeded(app=app, auth=auth, ids=ids)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def seeded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    """A seeded app for one test module: on SQLite, and on a fresh PostgreSQL database when
    STABLETRAIN_TEST_POSTGRES_URL is set (CI): NUL and int range errors differ between the two."""
    overrides: dict[str, Any] = {}
    base = url = None
    if request.param == "postgres":
        base = postgres_base_url()
        url = overrides["DATABASE_URL"] = create_database(base, prefix="stabletrain_fuzz")
    seeded = seed_app(tmp_path_factory.mktemp("fuzz"), **overrides)
    yield seeded
    with seeded.app.app_context():
        db.session.remove()
        db.engine.dispose()
    if base and url:
        drop_database(base, url)
