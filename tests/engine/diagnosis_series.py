"""Synthetic training records for the diagnosis tests: curves, events and activation rows."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from worker.engine.config import parse_spec
from worker.engine.diagnosis import diagnose
from worker.engine.diagnosis.spec import already_set, apply, full_spec


def steps(losses: list[float], norms: list[float] | None = None, *, clipped: Callable[[int], bool] | bool = False,
          val: dict[int, float] | None = None, nonfinite_at: int | None = None) -> list[dict[str, Any]]:
    """Step rows 1..n with the contract's keys."""
    norms = norms or [1.0] * len(losses)
    val = val or {}
    rows = []
    for i, (loss, norm) in enumerate(zip(losses, norms, strict=True)):
        step = i + 1
        rows.append({"step": step, "loss": loss, "lr": 1e-3, "grad_norm": norm,
                     "clipped": clipped(step) if callable(clipped) else clipped,
                     "nonfinite": step == nonfinite_at, "skipped": step == nonfinite_at, "val_loss": val.get(step)})
    return rows


def noisy(values: list[float], sigma: float, seed: int = 0) -> list[float]:
    """Multiplicative noise (loss noise scales with the loss), heavy-tailed now and then."""
    rng = random.Random(seed)
    out = []
    for v in values:
        z = rng.gauss(0, sigma) * (2 if rng.random() < 0.02 else 1)
        out.append(v * math.exp(z))
    return out


def decreasing(n: int, start: float = 5.5, end: float = 1.5, tau: float = 0.2) -> list[float]:
    """Exponential approach from start to end; tau is the fraction of the run per e-fold."""
    return [end + (start - end) * math.exp(-i / (tau * n)) for i in range(n)]


def issue8_run() -> dict[str, Any]:
    """The run of issue 8: 4x128 transformer, lr 3e-3 cosine, adaptive clipping, rollback, 1500 steps.

    Loss falls to 1.24 by step 200, rises to 2.6 by step 700 while the grad norm grows 1.4 -> 14,
    95% of steps clipped, three rollbacks cut the rate to 1/8, val loss 3.1 -> 3.5.
    """
    n = 1500
    base = []
    for i in range(1, n + 1):
        if i <= 200:
            base.append(1.24 + (5.5 - 1.24) * math.exp(-i / 40) - (5.5 - 1.24) * math.exp(-5))
        elif i <= 700:
            base.append(1.24 + (2.6 - 1.24) * (i - 200) / 500)
        else:
            base.append(2.6 - 0.2 * (i - 700) / 800)
    norms = [1.4 if i <= 200 else min(14.0, 1.4 * 10 ** ((i - 200) / 500)) for i in range(1, n + 1)]
    val = {s: (3.1 if s <= 200 else 3.1 + 0.4 * min(1.0, (s - 200) / 500)) for s in range(100, n + 1, 100)}
    rows = steps(noisy(base, 0.05, seed=1), noisy(norms, 0.2, seed=2), clipped=lambda s: s % 20 != 0, val=val)
    events = []
    for k, step in enumerate((450, 600, 690), start=1):
        events.append({"step": step, "kind": "grad_norm_spike", "message": "",
                       "data": {"policy": "rollback", "rule": "grad_norm", "value": 80.0, "median": 6.0, "factor": 10.0,
                                "attribution": {"offsets": [0, 64], "top": [{"offset": 64, "loss": 9.1,
                                                                             "excerpt": "the odd line"}]}}})
        events.append({"step": step, "kind": "rollback", "message": "", "data": {"to_step": step - 20, "rollbacks": k}})
        events.append({"step": step, "kind": "lr_lowered", "message": "", "data": {"lr_scale": 0.5 ** k}})
    spec = {"model": {"arch": "transformer", "n_layers": 4, "d_model": 128, "n_heads": 4},
            "training": {"max_steps": n, "lr": 3e-3, "schedule": "cosine", "eval_every": 100},
            "stabilization": {"clip": {"mode": "adaptive"}, "on_explosion": "rollback"}}
    return {"steps": rows, "layers": [], "events": events, "spec": spec}


def kinds(findings: list[dict[str, Any]]) -> set[str]:
    return {f["kind"] for f in findings}


def only(findings: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [f for f in findings if f["kind"] == kind]
    return found


def assert_recommendations_fit(record: dict[str, Any], finding: dict[str, Any]) -> None:
    """Every recommendation changes the spec, is valid applied after those before it (so all together),
    and is not repeated once applied."""
    spec = full_spec(record.get("spec"))
    recs = finding["recommendations"]
    for i, r in enumerate(recs):
        assert set(r) == {"field", "value", "why"} and r["why"], r
        assert not already_set(spec, r), f"{finding['kind']} recommends what is set: {r}"
        parse_spec(apply(spec, recs[:i + 1]))
    applied = apply(spec, recs)
    parse_spec(applied)
    again = diagnose(**{**record, "spec": applied})
    for f in again:
        for r in f["recommendations"]:
            assert not already_set(applied, r), f"{f['kind']} recommends what was just applied: {r}"
