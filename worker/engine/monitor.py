"""What the trainer measures: per-layer statistics, run history and health.

Layer statistics are computed with foreach ops and stay on the device until
the trainer flushes a batch, so measuring never adds a host sync of its own.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

# Consecutive clipped steps that make a "clip burst" event.
CLIP_BURST = 10
HEALTH_WINDOW = 50


@torch.no_grad()
def layer_grad_norms(weights: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each weight's gradient (zero where a weight got none), one device tensor."""
    grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in weights]
    return torch.stack(torch._foreach_norm(grads)).float()


@torch.no_grad()
def snapshot(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the weights before a step, to measure the step actually taken."""
    return [w.detach().clone() for w in weights]


@torch.no_grad()
def layer_update_stats(weights: list[torch.Tensor], before: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight norms and update-to-weight ratios ||w_after - w_before|| / ||w_after||."""
    weight_norms = torch.stack(torch._foreach_norm(weights)).float()
    deltas = torch._foreach_sub([w.detach() for w in weights], before)
    update_norms = torch.stack(torch._foreach_norm(deltas)).float()
    return weight_norms, update_norms / weight_norms.clamp_min(1e-12)


@dataclass
class PendingLayerStats:
    """Layer statistics of one step, still on the device."""

    step: int
    grad_norms: torch.Tensor
    weight_norms: torch.Tensor
    update_ratios: torch.Tensor

    def rows(self, names: list[str]) -> list[dict[str, Any]]:
        values = torch.stack([self.grad_norms, self.weight_norms, self.update_ratios]).cpu().tolist()
        return [
            {"layer": name, "grad_norm": g, "weight_norm": w, "update_ratio": u}
            for name, g, w, u in zip(names, *values, strict=True)
        ]


STEP_KEYS = ("step", "loss", "grad_norm", "clipped", "nonfinite", "skipped")


@dataclass
class RunHistory:
    """Compact host-side record of the run, for diagnosis and checkpoints."""

    steps: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in STEP_KEYS})
    layers: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def add_step(self, row: dict[str, Any]) -> None:
        for key in STEP_KEYS:
            self.steps[key].append(float(row[key]))

    def step_rows(self) -> list[dict[str, Any]]:
        columns = [self.steps[k] for k in STEP_KEYS]
        return [
            {"step": int(s), "loss": loss, "grad_norm": g, "clipped": bool(c), "nonfinite": bool(n), "skipped": bool(k)}
            for s, loss, g, c, n, k in zip(*columns, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        # Tensors keep long runs compact and loadable with weights_only=True.
        return {
            "steps": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.steps.items()},
            "layers": self.layers,
            "events": self.events,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = {k: state["steps"][k].tolist() for k in STEP_KEYS}
        self.layers = list(state["layers"])
        self.events = list(state["events"])

    def truncate_after(self, step: int) -> None:
        """Forget everything recorded after `step` (used when resuming)."""
        keep = sum(1 for s in self.steps["step"] if s <= step)
        for key in STEP_KEYS:
            del self.steps[key][keep:]
        self.layers = [r for r in self.layers if r["step"] <= step]
        self.events = [e for e in self.events if (e.get("step") or 0) <= step]


class HealthTracker:
    """Health of the run right now: ok, warning or critical."""

    def __init__(self) -> None:
        self.recent_clipped: deque[bool] = deque(maxlen=HEALTH_WINDOW)
        self.last_critical_step = -(10**9)
        self.last_warning_step = -(10**9)
        self.clip_streak = 0

    def observe(self, clipped: bool) -> bool:
        """Record a step; return True when it completes a burst of clipped steps."""
        self.recent_clipped.append(clipped)
        self.clip_streak = self.clip_streak + 1 if clipped else 0
        return self.clip_streak == CLIP_BURST

    def alarm(self, step: int) -> None:
        """Something critical (non-finite values, a rollback) happened at `step`."""
        self.last_critical_step = step

    def warn(self, step: int) -> None:
        """Something worth a look (a spike) happened at `step`."""
        self.last_warning_step = step

    def state(self, step: int) -> str:
        if step - self.last_critical_step < HEALTH_WINDOW:
            return "critical"
        clipped_most = len(self.recent_clipped) >= 10 and sum(self.recent_clipped) > 0.9 * len(self.recent_clipped)
        if clipped_most or step - self.last_warning_step < HEALTH_WINDOW:
            return "warning"
        return "ok"

