"""What the trainer measures: per-layer statistics, run history and health.

Layer statistics are computed with foreach ops and stay on the device until
the trainer flushes a batch, so measuring never adds a host sync of its own.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from .activations import STAT_KEYS as ACTIVATION_STAT_KEYS

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


STEP_KEYS = ("step", "loss", "grad_norm", "clipped", "nonfinite", "skipped", "lr", "val_loss")
LAYER_KEYS = ("grad_norm", "weight_norm", "update_ratio")
# Bounds that keep a million-step run's history small: layer records are thinned by half
# past MAX_LAYER_RECORDS (diagnosis reads medians, which survive thinning); events keep the newest.
MAX_LAYER_RECORDS = 4096
MAX_EVENTS = 10_000


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


class RunHistory:
    """Compact host-side record of the run, for diagnosis and checkpoints.

    Step values live in float64 arrays (8 bytes each, not a Python object),
    layer statistics in one row of numbers per recorded step.
    """

    def __init__(self) -> None:
        self.steps: dict[str, array] = {k: array("d") for k in STEP_KEYS}
        self.layer_names: list[str] = []
        self.layer_steps: list[int] = []
        self.layer_values: list[list[float]] = []  # per recorded step: LAYER_KEYS x layers, flat
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        # Activation records: sites and kinds once, then per recorded step one flat float array
        # of ACTIVATION_WIDTH numbers per site (stats, through-time ratio, through-time norms).
        self.act_sites: list[str] = []
        self.act_kinds: list[str] = []
        self.act_positions: list[int] = []
        self.act_steps: list[int] = []
        self.act_values: list[array] = []

    def add_step(self, row: dict[str, Any]) -> None:
        for key in STEP_KEYS:
            value = row.get(key)
            self.steps[key].append(math.nan if value is None else float(value))

    def add_layers(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.layer_names = [r["layer"] for r in rows]
        self.layer_steps.append(step)
        self.layer_values.append([r[k] for r in rows for k in LAYER_KEYS])
        if len(self.layer_steps) > MAX_LAYER_RECORDS:
            self.layer_steps = self.layer_steps[::2]
            self.layer_values = self.layer_values[::2]

    def add_activations(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.act_sites = [r["site"] for r in rows]
        self.act_kinds = [r["kind"] for r in rows]
        flat = array("d")
        for row in rows:
            through_time = row.get("grad_time") or []
            if through_time:
                self.act_positions = [int(t) for t, _ in through_time]
            flat.extend(_num(row.get(k)) for k in ACTIVATION_STAT_KEYS)
            norms = [n for _, n in through_time] or [math.nan] * len(self.act_positions)
            flat.extend(_num(v) for v in norms)
        self.act_steps.append(step)
        self.act_values.append(flat)
        if len(self.act_steps) > MAX_LAYER_RECORDS:
            self.act_steps = self.act_steps[::2]
            self.act_values = self.act_values[::2]

    def step_rows(self) -> list[dict[str, Any]]:
        columns = [self.steps[k] for k in STEP_KEYS]
        return [
            {"step": int(s), "loss": loss, "grad_norm": g, "clipped": bool(c), "nonfinite": bool(n),
             "skipped": bool(k), "lr": lr, "val_loss": None if math.isnan(v) else v}
            for s, loss, g, c, n, k, lr, v in zip(*columns, strict=True)
        ]

    @property
    def activations(self) -> list[dict[str, Any]]:
        """Activation rows {step, site, kind, <stats>, grad_time, grad_time_ratio} in step then depth order."""
        n_stats, positions = len(ACTIVATION_STAT_KEYS), self.act_positions
        width = n_stats + len(positions)
        rows = []
        for step, values in zip(self.act_steps, self.act_values, strict=True):
            for i, (site, kind) in enumerate(zip(self.act_sites, self.act_kinds, strict=True)):
                chunk = values[i * width:(i + 1) * width]
                stats = {k: _none_if_nan(v) for k, v in zip(ACTIVATION_STAT_KEYS, chunk[:n_stats], strict=True)}
                norms = list(chunk[n_stats:])
                has_time = kind == "recurrent" and norms and not math.isnan(norms[0])
                rows.append({
                    "step": step, "site": site, "kind": kind, **stats,
                    "grad_time": [[t, n] for t, n in zip(positions, norms, strict=True)] if has_time else None,
                    "grad_time_ratio": norms[0] / norms[-1] if has_time and norms[-1] > 0 else None,
                })
        return rows

    @property
    def layers(self) -> list[dict[str, Any]]:
        """Layer rows {step, layer, grad_norm, weight_norm, update_ratio} in step then depth order."""
        width = len(LAYER_KEYS)
        return [
            {"step": step, "layer": name, **dict(zip(LAYER_KEYS, values[i * width:(i + 1) * width], strict=True))}
            for step, values in zip(self.layer_steps, self.layer_values, strict=True)
            for i, name in enumerate(self.layer_names)
        ]

    def state_dict(self) -> dict[str, Any]:
        # Tensors keep long runs compact and loadable with weights_only=True.
        return {
            "steps": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.steps.items()},
            "layer_names": list(self.layer_names),
            "layer_steps": torch.tensor(self.layer_steps, dtype=torch.int64),
            "layer_values": torch.tensor(self.layer_values, dtype=torch.float64),
            "events": list(self.events),
            "activations": {
                "sites": list(self.act_sites), "kinds": list(self.act_kinds),
                "positions": list(self.act_positions),
                "steps": torch.tensor(self.act_steps, dtype=torch.int64),
                "values": torch.tensor([list(v) for v in self.act_values], dtype=torch.float64),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n_steps = len(state["steps"]["step"])
        self.steps = {k: array("d", state["steps"][k].tolist() if k in state["steps"] else [math.nan] * n_steps)
                      for k in STEP_KEYS}
        self.layer_names = list(state["layer_names"])
        self.layer_steps = state["layer_steps"].tolist()
        self.layer_values = state["layer_values"].tolist()
        self.events = deque(state["events"], maxlen=MAX_EVENTS)
        acts = state.get("activations")
        if acts:
            self.act_sites, self.act_kinds = list(acts["sites"]), list(acts["kinds"])
            self.act_positions = list(acts["positions"])
            self.act_steps = acts["steps"].tolist()
            self.act_values = [array("d", row) for row in acts["values"].tolist()]

    def truncate_after(self, step: int) -> None:
        """Forget everything recorded after `step` (used when resuming)."""
        keep = sum(1 for s in self.steps["step"] if s <= step)
        for key in STEP_KEYS:
            del self.steps[key][keep:]
        keep_layers = sum(1 for s in self.layer_steps if s <= step)
        del self.layer_steps[keep_layers:]
        del self.layer_values[keep_layers:]
        keep_acts = sum(1 for s in self.act_steps if s <= step)
        del self.act_steps[keep_acts:]
        del self.act_values[keep_acts:]
        self.events = deque((e for e in self.events if (e.get("step") or 0) <= step), maxlen=MAX_EVENTS)


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

    def state_dict(self) -> dict[str, Any]:
        return {"recent_clipped": list(self.recent_clipped), "last_critical_step": self.last_critical_step,
                "last_warning_step": self.last_warning_step, "clip_streak": self.clip_streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent_clipped = deque(state["recent_clipped"], maxlen=HEALTH_WINDOW)
        self.last_critical_step = state["last_critical_step"]
        self.last_warning_step = state["last_warning_step"]
        self.clip_streak = state["clip_streak"]

    def state(self, step: int) -> str:
        if step - self.last_critical_step < HEALTH_WINDOW:
            return "critical"
        clipped_most = len(self.recent_clipped) >= 10 and sum(self.recent_clipped) > 0.9 * len(self.recent_clipped)
        if clipped_most or step - self.last_warning_step < HEALTH_WINDOW:
            return "warning"
        return "ok"

