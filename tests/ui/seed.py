"""Records of a job inserted straight through the models (no worker): steps with a loss/grad spike and
a non-finite step, per-layer rows whose early layers get vanishing gradients (with their depth
`position`, as the worker records them, or without for a job recorded before positions existed),
a diagnosis, events and a checkpoint file."""

from __future__ import annotations

import hashlib
import math
from datetime import timedelta
from typing import Any

from app.extensions import db
from app.models import ActivationMetric, Checkpoint, Event, Job, LayerMetric, StepMetric, utcnow
from app.services.storage import checkpoint_key, storage

LAYERS = ["embed.weight", "layers.0.rnn.weight_ih_l0", "layers.0.rnn.weight_hh_l0",
          "layers.1.rnn.weight_ih_l0", "layers.1.rnn.weight_hh_l0", "head.weight"]
SPIKE_STEP, NAN_STEP = 120, 150
SPEC: dict[str, Any] = {
    "name": "seeded-lstm",
    "model": {"arch": "lstm", "n_layers": 2, "d_model": 64, "hidden": 128},
    "training": {"max_steps": 200, "lr": 3e-3, "schedule": "cosine", "warmup_steps": 20, "eval_every": 50},
    "stabilization": {"clip": {"mode": "norm", "max_norm": 1.0}, "on_explosion": "rollback"},
    "monitoring": {"layer_stats_every": 10},
    "checkpointing": {"every_steps": 100, "keep_last": 3},
}
FINDINGS = [
    {"kind": "exploding", "severity": "critical",
     "summary": f"gradient norm spiked to 80 at step {SPIKE_STEP} (median before 0.9)",
     "steps": {"first": SPIKE_STEP, "last": SPIKE_STEP}, "layers": [],
     "evidence": {"peak_grad_norm": 80.0, "peak_step": SPIKE_STEP, "median_before": 0.9},
     "recommendations": [{"field": "training.lr", "value": 0.0015, "why": "halve the learning rate"}]},
    {"kind": "vanishing", "severity": "critical",
     "summary": "2 layer(s) get gradients 1.0e+05x weaker than the strongest layer (weakest: embed.weight)",
     "steps": {"first": 10, "last": 200}, "layers": LAYERS[:2],
     "evidence": {"median_grad_norm": {"embed.weight": 3e-7, "head.weight": 0.3}},
     "recommendations": [{"field": "model.residual", "value": True,
                          "why": "skip connections carry gradient to the early layers"}]},
]


# a spike event's data as the engine reports it (docs/contracts.md): the batch rows with the highest loss
SPIKE_DATA: dict[str, Any] = {
    "policy": "rollback", "rule": "loss", "value": 9.0, "median": 2.1, "factor": 4.3,
    "attribution": {"offsets": [1024, 4096, 8192, 16384],
                    "top": [{"offset": 8192, "loss": 11.5, "excerpt": "<script>x</script> ZZZZ qqqq garbled"},
                            {"offset": 1024, "loss": 7.25, "excerpt": "the quick brown fox"}]},
}


def step_row(step: int, max_steps: int = 200) -> dict[str, Any]:
    """One plausible step row; a spike at SPIKE_STEP and a skipped non-finite step at NAN_STEP."""
    warm = min(1.0, step / 20)
    lr = 3e-3 * warm * 0.5 * (1 + math.cos(math.pi * step / max_steps))
    loss = 5.5 * math.exp(-step / 60) + 1.6 + 0.05 * math.sin(step)
    grad = 0.9 + 0.4 * math.sin(step / 3)
    row: dict[str, Any] = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad,
                           "grad_norm_clipped": min(grad, 1.0), "clipped": grad > 1.0, "nonfinite": False,
                           "skipped": False, "loss_scale": None, "tokens_per_s": 20000.0,
                           "tokens_seen": step * 1024, "val_loss": loss + 0.1 if step % 50 == 0 else None,
                           "time": 1_700_000_000.0 + step}
    if step == SPIKE_STEP:
        row.update(loss=9.0, grad_norm=80.0, grad_norm_clipped=1.0, clipped=True)
    if step == NAN_STEP:
        row.update(loss=None, grad_norm=None, grad_norm_clipped=None, nonfinite=True, skipped=True)
    return row


def layer_rows(step: int, layers: list[str] = LAYERS, positions: bool = True) -> list[dict[str, Any]]:
    """Per-layer rows at one step (`layers` in depth order): the first two ~1e-7, the rest 1e-2..1; x100
    at the spike. Each row has its index in `layers` as `position` unless positions=False (an old job)."""
    rows = []
    for i, name in enumerate(layers):
        grad = 3e-7 * (1 + 0.2 * math.sin(step)) if i < 2 else 10 ** (-2 + i / 3)
        if step == SPIKE_STEP:
            grad *= 100
        if step == NAN_STEP and i == len(layers) - 1:
            grad = None
        rows.append({"step": step, "layer": name, "position": i if positions else None, "grad_norm": grad,
                     "weight_norm": 10.0, "update_ratio": 1e-3})
    return rows


RNN_SITES = [("layers.0.rnn", "recurrent"), ("layers.1.rnn", "recurrent"), ("head", "output")]
TRANSFORMER_SITES = [("blocks.0.attn", "attention"), ("blocks.0.mlp.act", "relu"), ("blocks.1.attn", "attention"),
                     ("blocks.1.mlp.act", "relu"), ("head", "output")]


def activation_rows(step: int, sites: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Activation rows at one step, shaped as the worker stores them: recurrent layers saturate more and lose
    gradient through time as training goes on (layer 0 faster), ReLU layers die, attention logits grow."""
    rows = []
    for i, (site, kind) in enumerate(sites):
        row: dict[str, Any] = {"step": step, "site": site, "position": i, "kind": kind, "mean": 0.0, "std": 1.0}
        layer = int(site.split(".")[1]) if site.count(".") else 0
        if kind == "recurrent":
            ratio = 10.0 ** (-1 - step / (40 if layer == 0 else 80))
            row.update(saturated_frac=min(1.0, 0.1 + step / 250 + 0.2 * (layer == 0)), grad_time_ratio=ratio,
                       grad_time=[[0, ratio], [16, ratio ** 0.75], [32, ratio ** 0.5], [48, ratio ** 0.25], [63, 1.0]])
        elif kind == "relu":
            row.update(dead_frac=min(1.0, 0.05 + step / 400 + 0.3 * layer))
        elif kind == "attention":
            row.update(attn_max_logit=5.0 + step / (10 - 5 * layer), attn_entropy=2.0 - step / 400)
        elif kind == "output":
            row.update(z_lse=math.log(96) + step / 100)
        rows.append(row)
    return rows


def add_steps(job_id: str, first: int, last: int, layers: bool = True, layer_names: list[str] = LAYERS,
              positions: bool = True, sites: list[tuple[str, str]] | None = RNN_SITES) -> None:
    """Insert step rows first..last (and layer and activation rows every 10 steps) and move the job's progress."""
    for step in range(first, last + 1):
        db.session.add(StepMetric(job_id=job_id, **step_row(step)))
        if layers and step % 10 == 0:
            for row in layer_rows(step, layer_names, positions):
                db.session.add(LayerMetric(job_id=job_id, **row))
            for row in activation_rows(step, sites or []):
                db.session.add(ActivationMetric(job_id=job_id, **row))
    job = db.session.get(Job, job_id)
    job.step = last
    job.tokens_seen = last * 1024
    job.latest = {k: v for k, v in step_row(last).items()}
    db.session.commit()


def make_job(owner_id: str, status: str = "succeeded", steps: int = 200, name: str = "seeded-lstm",
             layer_names: list[str] = LAYERS, positions: bool = True,
             sites: list[tuple[str, str]] | None = RNN_SITES) -> str:
    """A job with `steps` steps of records (layer rows of `layer_names`, in depth order, with or without
    positions, and activation rows of `sites`); a finished one also gets its diagnosis, events (a loss
    spike with its attribution) and a checkpoint."""
    now = utcnow()
    job = Job(owner_id=owner_id, dataset_id=None, name=name, spec={**SPEC, "name": name}, status=status,
              max_steps=200, started_at=now - timedelta(minutes=5), attempts=1,
              health="critical" if status == "succeeded" else "ok")
    db.session.add(job)
    db.session.commit()
    db.session.add(Event(job_id=job.id, step=0, kind="started", message="training started on cpu"))
    if steps:
        add_steps(job.id, 1, steps, layer_names=layer_names, positions=positions, sites=sites)
    if status in ("succeeded", "failed", "cancelled"):
        job.finished_at = now
        job.diagnosis = {"findings": FINDINGS, "summary": "; ".join(f["summary"] for f in FINDINGS)}
        for step, kind, message in [(SPIKE_STEP, "loss_spike", "loss 9.0 vs median 2.1"),
                                    (NAN_STEP, "step_skipped", "non-finite gradient; step skipped"),
                                    (200, "checkpoint", "checkpoint at step 200"),
                                    (200, "finished", "finished after 200 steps")]:
            data = SPIKE_DATA if kind == "loss_spike" else None
            db.session.add(Event(job_id=job.id, step=step, kind=kind, message=message, data=data))
        add_checkpoint(job.id, 200)
    db.session.commit()
    return job.id


def add_checkpoint(job_id: str, step: int) -> None:
    """A small checkpoint file and its record."""
    body = b"stabletrain test checkpoint " + str(step).encode()
    storage().put_bytes(body, checkpoint_key(job_id, step))
    db.session.add(Checkpoint(job_id=job_id, step=step, bytes=len(body), sha256=hashlib.sha256(body).hexdigest(),
                              val_loss=1.9, health="ok"))
