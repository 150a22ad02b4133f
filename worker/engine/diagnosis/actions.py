"""The engine's own actions as evidence: rollbacks and the learning-rate cuts that come with them.

A run the engine had to rescue was unstable even when it finished with a good
loss, so it is never reported healthy. Skipped steps are counted in the
findings that explain them (nonfinite, exploding, loss_spike, rollbacks): a
skip alone can be an fp16 loss-scale overflow, which is routine.
"""

from __future__ import annotations

from .core import Finding, Run, finding
from .spec import Rec, get, longer_warmup, lower_lr
from .stats import finite

# Three rollbacks halve the rate three times (x1/8 with the default factor): the spec's rate was far off.
ROLLBACKS_CRITICAL = 3


def _lr_scale(run: Run) -> float:
    scales = [e["data"]["lr_scale"] for e in run.events_of("lr_lowered") if finite((e.get("data") or {}).get("lr_scale"))]
    return scales[-1] if scales else 1.0


def _recs(run: Run, lr_scale: float) -> list[Rec]:
    factor = min(0.5, lr_scale)
    return [lower_lr(run.spec, factor, f"the engine had to lower the rate to x{lr_scale:g} to keep the run going; "
                     "start there instead of at a rate that explodes"),
            longer_warmup(run.spec, "a longer warm-up avoids the early explosions that trigger rollbacks")]


def rollbacks(run: Run) -> list[Finding]:
    events = run.events_of("rollback")
    if not events:
        return []
    skipped = [int(r["step"]) for r in run.steps if r.get("skipped")]
    steps = [int(e["step"]) for e in events if e.get("step") is not None]
    scale = _lr_scale(run)
    count = max([len(events), *[int((e.get("data") or {}).get("rollbacks") or 0) for e in events]])
    severity = "critical" if count >= ROLLBACKS_CRITICAL else "warning"
    return [finding(
        run, "rollbacks", severity,
        f"the engine rolled back {count} time(s) (first at step {min(steps)}) and cut the learning rate to "
        f"x{scale:g}: the run was unstable even if it recovered",
        steps, [],
        {"rollbacks": count, "rollback_steps": steps,
         "to_steps": [(e.get("data") or {}).get("to_step") for e in events], "lr_scale": scale,
         "skipped_steps": len(skipped), "max_rollbacks": get(run.spec, "stabilization.max_rollbacks")},
        _recs(run, scale),
    )]
