"""Gradient findings: non-finite values, explosions, vanishing across depth, oversized updates."""

from __future__ import annotations

import bisect
import math
import statistics
from collections import defaultdict
from typing import Any

from .core import Finding, Run, finding
from .spec import (
    RECURRENT,
    Rec,
    add_norm,
    clip_norm,
    get,
    init_for_activation,
    lower_lr,
    rec,
    to_relu,
)
from .stats import finite

# A layer whose typical gradient is this far below the strongest layer's is vanishing
# (three orders of magnitude: the early layers then learn ~1000x slower than the last).
VANISHING_RATIO = 1e-3
# Gradients this small carry no signal at all, whatever the other layers do.
VANISHING_ABS = 1e-7
# Window of steps before a step whose median is the reference for a jump.
SPIKE_WINDOW = 20
# An explosion this many times the spec's explosion_factor, or this many of them, is critical.
EXPLOSION_CRITICAL_FACTOR = 5.0
EXPLOSION_CRITICAL_COUNT = 3
# Healthy update-to-weight ratio is around 1e-3 (Karpathy); 1e-1 rewrites a tenth of a layer per step.
UPDATE_RATIO_HIGH = 1e-1
UPDATE_RATIO_LOW = 1e-6


def jumps(points: list[tuple[int, float]], ratio: float, min_jump: float = 0.0) -> list[tuple[int, float, float]]:
    """(step, value, median) where a value exceeds ratio x (and min_jump over) the median of the window before it."""
    out = []
    window = sorted(v for _, v in points[:SPIKE_WINDOW])  # kept sorted as it slides: O(n * window)
    mid = SPIKE_WINDOW // 2
    for i in range(SPIKE_WINDOW, len(points)):
        median = window[mid] if SPIKE_WINDOW % 2 else (window[mid - 1] + window[mid]) / 2
        step, value = points[i]
        if median > 0 and value > ratio * median and value - median > min_jump:
            out.append((step, value, median))
        del window[bisect.bisect_left(window, points[i - SPIKE_WINDOW][1])]
        bisect.insort(window, value)
    return out


def explosion_factor(run: Run) -> float:
    """The spec's stabilization.explosion_factor: the same rule the engine's guard applies."""
    factor = get(run.spec, "stabilization.explosion_factor", 10.0)
    return factor if finite(factor) and factor > 1 else 10.0


def stabilize_recs(run: Run) -> list[Rec]:
    """Bound the update: clipping where there is none, then a lower rate."""
    recs: list[Rec] = []
    if get(run.spec, "stabilization.clip.mode", "none") in ("none", None):
        recs += clip_norm(run.spec, 1.0, "global-norm clipping bounds every update, whatever the gradient does")
    recs.append(lower_lr(run.spec, 0.3, "a lower learning rate shrinks every step; too high a rate is the usual cause"))
    return recs


def nonfinite(run: Run) -> list[Finding]:
    bad = [int(r["step"]) for r in run.steps if r.get("nonfinite")]
    if not bad:
        return []
    skipped = sum(1 for r in run.steps if r.get("skipped"))
    recs = stabilize_recs(run)
    if get(run.spec, "stabilization.precision") == "fp16":
        recs.append(rec("stabilization.precision", "bf16", "bf16 has fp32's range, so activations cannot overflow"))
    if get(run.spec, "model.arch") == "rnn":
        recs.append(rec("model.arch", "lstm", "gated recurrences keep the signal bounded over long sequences"))
    return [finding(
        run, "nonfinite", "critical",
        f"loss or gradient became NaN/inf on {len(bad)} step(s), first at step {bad[0]}",
        bad, [], {"nonfinite_steps": len(bad), "first_step": bad[0], "skipped_steps": skipped}, recs,
    )]


def guard_spikes(run: Run, rule: str, legacy_kind: str | None = None) -> list[dict[str, Any]]:
    """The engine guard's spike events of one rule (grad_norm or loss)."""
    kinds = {"grad_norm_spike", "loss_spike"}
    out = []
    for e in run.events:
        if e.get("kind") not in kinds:
            continue
        data = e.get("data") or {}
        event_rule = data.get("rule") or ("grad_norm" if e["kind"] == "grad_norm_spike" else legacy_kind)
        if event_rule == rule:
            out.append(e)
    return out


def attribution(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The batch rows with the highest loss at the worst attributed spike (what the user should look at)."""
    best: list[dict[str, Any]] = []
    worst = -math.inf
    for e in events:
        data = e.get("data") or {}
        top = (data.get("attribution") or {}).get("top") or []
        value = data.get("value") if finite(data.get("value")) else 0.0
        if top and value > worst:
            worst, best = value, [{"step": e.get("step"), **row} for row in top]
    return best


def exploding(run: Run) -> list[Finding]:
    factor = explosion_factor(run)
    # Early steps have large norms by nature, so each step is judged against the steps before it.
    spikes = jumps(run.series("grad_norm"), factor)
    guard = guard_spikes(run, "grad_norm")
    diverged = any(r.get("nonfinite") for r in run.steps)
    if not spikes and not guard and not diverged:
        return []
    norms = run.series("grad_norm")
    spike_steps = sorted({s for s, _, _ in spikes} | {int(e["step"]) for e in guard if e.get("step") is not None})
    evidence: dict[str, Any] = {"explosion_factor": factor, "spike_steps": len(spike_steps), "nonfinite": diverged,
                                "guard_events": len(guard)}
    if spikes:
        peak_step, peak, median = max(spikes, key=lambda s: s[1] / s[2])
        summary = (f"gradient norm exploded to {peak:.3g} at step {peak_step} "
                   f"({peak / median:.0f}x the median {median:.3g} of the {SPIKE_WINDOW} steps before; "
                   f"the rule is {factor:g}x)")
    elif guard:
        data = max(guard, key=lambda e: (e.get("data") or {}).get("value") or 0).get("data") or {}
        peak_step, peak, median = int(guard[0]["step"]), data.get("value", math.nan), data.get("median", math.nan)
        summary = f"the engine's guard caught {len(guard)} grad-norm explosion(s) over {factor:g}x the recent median"
    else:
        # Divergence straight to NaN is an explosion too; report the largest finite norm seen.
        peak_step, peak = max(norms, key=lambda sn: sn[1]) if norms else (int(run.steps[0]["step"]), math.nan)
        median = statistics.median(n for _, n in norms) if norms else math.nan
        summary = f"gradients diverged to non-finite values; largest finite grad norm {peak:.3g} at step {peak_step}"
    evidence |= {"peak_grad_norm": peak, "peak_step": peak_step, "median_before": median}
    top = attribution(guard)
    if top:
        evidence["attribution"] = top
    ratio = peak / median if finite(peak) and finite(median) and median > 0 else math.inf
    critical = diverged or len(spike_steps) >= EXPLOSION_CRITICAL_COUNT or ratio >= EXPLOSION_CRITICAL_FACTOR * factor
    recs = stabilize_recs(run)
    if get(run.spec, "model.init") == "normal" and (get(run.spec, "model.init_std") or 0) > 0.05:
        recs.append(rec("model.init_std", 0.02, "large initial weights amplify the signal at every layer or time step"))
    if get(run.spec, "model.arch") in RECURRENT:
        recs.append(rec("model.recurrent_init", "orthogonal", "orthogonal recurrent weights keep the spectral radius at 1"))
    if get(run.spec, "stabilization.on_explosion") in ("none", None):
        recs.append(rec("stabilization.on_explosion", "rollback",
                        "roll back to the last healthy state and lower the rate instead of carrying the damage"))
    if get(run.spec, "stabilization.weight_max_norm") is None:
        recs.append(rec("stabilization.weight_max_norm", 3.0, "a max-norm constraint caps how large weights can grow"))
    return [finding(run, "exploding", "critical" if critical else "warning", summary,
                    spike_steps or [peak_step], [], evidence, recs)]


def layer_medians(layers: list[dict[str, Any]], key: str) -> dict[str, float]:
    series: dict[str, list[float]] = defaultdict(list)
    for row in layers:
        if finite(row.get(key)):
            series[row["layer"]].append(row[key])
    return {name: statistics.median(vals) for name, vals in series.items() if vals}


def layer_order(layers: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(row["layer"] for row in layers))


def is_embedding(name: str) -> bool:
    # Embedding rows get gradient only for the tokens in the batch: weak by nature, not by depth.
    return "emb" in name


def _first_weak_step(layers: list[dict[str, Any]], weak: set[str], strongest: float) -> int | None:
    """First recorded step at which a weak layer was already under the vanishing line."""
    for row in layers:
        if row["layer"] in weak and finite(row.get("grad_norm")) and (
                row["grad_norm"] < VANISHING_RATIO * strongest or row["grad_norm"] < VANISHING_ABS):
            return int(row["step"])
    return None


def vanishing_recs(run: Run) -> list[Rec]:
    """Fixes for a signal that shrinks with depth, matched to the activation and what the spec already has."""
    spec = run.spec
    activation = get(spec, "model.activation")
    recs: list[Rec] = []
    if activation == "sigmoid":
        # Sigmoid's slope is at most 0.25 per layer: no init undoes that, change the activation.
        recs += to_relu(spec, "sigmoid's derivative is at most 0.25, so every layer divides the gradient by 4 or more")
    recs += init_for_activation(spec)
    recs += add_norm(spec, "normalization keeps pre-activations out of the saturated range")
    if not get(spec, "model.residual", False):
        recs.append(rec("model.residual", True, "residual connections give gradients a direct path to early layers"))
    if activation == "tanh":
        recs += to_relu(spec, "ReLU passes the gradient unchanged where it is active (an alternative to Xavier + norm)")
    n_layers = get(spec, "model.n_layers")
    if isinstance(n_layers, int) and n_layers > 4:
        recs.append(rec("model.n_layers", max(2, n_layers // 2), "fewer layers means fewer factors shrinking the gradient"))
    return recs


def vanishing(run: Run) -> list[Finding]:
    medians = {n: v for n, v in layer_medians(run.layers, "grad_norm").items() if not is_embedding(n)}
    if len(medians) < 2:
        return []
    order = [name for name in layer_order(run.layers) if name in medians]
    strongest = max(medians.values())
    if strongest <= 0:
        return []
    weak = [n for n in order if medians[n] < VANISHING_RATIO * strongest or medians[n] < VANISHING_ABS]
    if not weak:
        return []
    steps = [int(r["step"]) for r in run.layers if r["layer"] in weak]
    first = _first_weak_step(run.layers, set(weak), strongest)
    weakest = min(weak, key=lambda n: medians[n])
    return [finding(
        run, "vanishing", "critical" if len(weak) > 1 else "warning",
        f"{len(weak)} layer(s) get gradients {strongest / max(medians[weakest], 1e-30):.1e}x weaker than the "
        f"strongest layer (weakest: {weakest})",
        [first if first is not None else min(steps), max(steps)], weak,
        {"median_grad_norm": {n: medians[n] for n in order}, "strongest": strongest,
         "ratio_threshold": VANISHING_RATIO},
        vanishing_recs(run),
    )]


def update_ratio_high(run: Run) -> list[Finding]:
    medians = layer_medians(run.layers, "update_ratio")
    high = sorted(n for n, v in medians.items() if v > UPDATE_RATIO_HIGH)
    if not high:
        return []
    rows = [r for r in run.layers if r["layer"] in high]
    first = next((int(r["step"]) for r in rows if finite(r.get("update_ratio")) and r["update_ratio"] > UPDATE_RATIO_HIGH),
                 int(rows[0]["step"]))
    return [finding(
        run, "update_ratio_high", "warning",
        f"{len(high)} layer(s) change by more than {UPDATE_RATIO_HIGH:g} of their norm per step (healthy is about 1e-3)",
        [first, max(int(r["step"]) for r in rows)], high, {"median_update_ratio": {n: medians[n] for n in high}},
        [lower_lr(run.spec, 0.3, "updates this large rewrite the weights every step: the rate is too high")],
    )]
