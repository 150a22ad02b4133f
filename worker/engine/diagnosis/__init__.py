"""Training-health diagnosis: a pure function from recorded series to findings.

Each finding names its kind, severity, when it started (steps.first), the
layers or sites concerned, the numbers behind it and actions a user can put in
the next spec. Detectors live by family: gradients (per-step and per-layer
norms), trends (curves over the run), actions (what the engine had to do) and
activations (forward statistics). Standard library only: the API and CLI may
import it for `health_of` without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import actions, activations, gradients, trends
from .core import SEVERITIES, Finding, Run, health_of
from .spec import full_spec

__all__ = ["SEVERITIES", "Finding", "diagnose", "health_of", "summarize"]

# The order is the order of findings within a severity (root causes first: non-finite values and
# explosions before what follows from them), and lets a detector read earlier findings
# (stalled defers to diverging).
DETECTORS: tuple[Callable[[Run], list[Finding]], ...] = (
    gradients.nonfinite,
    gradients.exploding,
    trends.diverging,
    actions.rollbacks,
    gradients.vanishing,
    activations.vanishing_through_time,
    activations.saturated,
    activations.dead_units,
    activations.attention_logit_growth,
    trends.loss_spikes,
    trends.clipping_saturated,
    trends.overfitting,
    gradients.update_ratio_high,
    trends.stalled,
)


def diagnose(
    steps: list[dict[str, Any]],
    layers: list[dict[str, Any]],
    events: list[dict[str, Any]] | None = None,
    spec: dict[str, Any] | None = None,
    activations: list[dict[str, Any]] | None = None,
) -> list[Finding]:
    """Findings for a run, most severe first (then in DETECTORS order); empty when the run looks healthy."""
    run = Run(list(steps), list(layers), list(events or []), list(activations or []), full_spec(spec))
    for detect in DETECTORS:
        for f in detect(run):
            run.found[f["kind"]] = f
    order = {s: i for i, s in enumerate(SEVERITIES)}
    # stable: within a severity, detector order (the retry route applies the first finding's value)
    return sorted(run.found.values(), key=lambda f: order[f["severity"]])


def summarize(findings: list[Finding]) -> str:
    """One line per finding, for terminals and job records; the first line carries the health."""
    if not findings:
        return "healthy: no problems found"
    return "\n".join(f"[{f['severity']}] {f['summary']}" for f in findings)
