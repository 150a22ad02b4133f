"""A job's records shaped to trip keyset paging: several layer and activation rows per step, a step whose
layer rows have no position (an old job) next to positioned ones, a step mixing both, and events that
share a step. Inserted straight through the models (no worker)."""

from __future__ import annotations

import math
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import insert

from app.extensions import db
from app.models import ActivationMetric, Event, LayerMetric, StepMetric

N_STEPS = 12
# depth order differs from name order, so a cursor that compared names only would go wrong
LAYERS = ["tok_emb.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc.weight", "blocks.10.mlp.fc.weight",
          "head.weight"]
SITES = [("blocks.0.attn", "attention"), ("blocks.0.mlp.act", "gelu"), ("blocks.1.attn", "attention"),
         ("head", "output")]
EVENT_STEPS = [0, 0, 3, 3, 3, 5, None, 8, 8, 12]


def step_rows(job_id: str) -> list[dict[str, Any]]:
    return [{"job_id": job_id, "step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0 + 0.01 * s,
             "clipped": False, "nonfinite": False, "skipped": False} for s in range(1, N_STEPS + 1)]


def layer_rows(job_id: str) -> list[dict[str, Any]]:
    """Steps 1-2: no positions (name order); 3-10: positions; 11: two rows with and two without."""
    rows = []
    for step in range(1, N_STEPS):
        for i, name in enumerate(LAYERS):
            position: int | None = i
            if step <= 2 or (step == 11 and i % 2):
                position = None
            rows.append({"job_id": job_id, "step": step, "layer": name, "position": position,
                         "grad_norm": 10.0 ** -i, "weight_norm": 1.0, "update_ratio": 1e-3})
    return rows


def activation_rows(job_id: str, every: int = 2) -> list[dict[str, Any]]:
    rows = []
    for step in range(every, N_STEPS + 1, every):
        for i, (site, kind) in enumerate(SITES):
            rows.append({"job_id": job_id, "step": step, "site": site, "position": i, "kind": kind,
                         "mean": 0.0, "std": 1.0,
                         "dead_frac": 0.1 * i if kind == "gelu" else None,
                         "attn_max_logit": 5.0 + step if kind == "attention" else None,
                         "attn_entropy": 1.0 if kind == "attention" else None,
                         "z_lse": math.log(100) if kind == "output" else None})
    return rows


def fill(job_id: str) -> None:
    """Insert every kind of row for `job_id` (call inside an app context)."""
    db.session.execute(insert(StepMetric), step_rows(job_id))
    db.session.execute(insert(LayerMetric), layer_rows(job_id))
    db.session.execute(insert(ActivationMetric), activation_rows(job_id))
    for i, step in enumerate(EVENT_STEPS):
        db.session.add(Event(job_id=job_id, step=step, kind="clip_burst", message=f"e{i}", data={"i": i}))
    db.session.commit()


def follow(client: FlaskClient, auth: dict[str, str], url: str) -> list[dict[str, Any]]:
    """Every item of a listing, following next_cursor from `url` (which may hold after_step/after_id)."""
    items: list[dict[str, Any]] = []
    page = client.get(url, headers=auth).json
    for _ in range(10_000):
        items += page["items"]
        if page["next_cursor"] is None:
            return items
        assert page["items"], "a page before the end is never empty"
        base = url.split("?")[0] + "?" + "&".join(p for p in url.split("?")[1].split("&")
                                                    if not p.startswith(("after_step=", "after_id=")))
        page = client.get(f"{base}&cursor={page['next_cursor']}", headers=auth).json
    raise AssertionError("the listing never ended")
