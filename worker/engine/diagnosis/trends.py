"""Curve findings: slow divergence, plateaus, loss spikes, overfitting and saturated clipping.

Jumps are judged against the recent median; trends on bin medians with
Theil-Sen slopes and Mann-Kendall tests (see stats.py), so a loss that creeps
up over hundreds of steps is seen although no single step jumps.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from .core import Finding, Run, finding
from .gradients import SPIKE_WINDOW, UPDATE_RATIO_LOW, attribution, guard_spikes, jumps, layer_medians
from .spec import (
    Rec,
    add_norm,
    clip_norm,
    get,
    init_for_activation,
    longer_warmup,
    lower_lr,
    rec,
    round_sig,
    to_relu,
)
from .stats import bin_medians, finite, mann_kendall_z, rolling_median, theil_sen_slope

# --- diverging: the smoothed loss rises for a sustained stretch while the grad norm grows.
# The curve is judged as ~100 bin medians (each 1% of the run) so per-step noise averages out.
DIVERGE_BINS = 100
# The minimum is located on a rolling median of 5 bins, so one low bin cannot pose as "the best point".
DIVERGE_SMOOTH = 5
# A rise must span this many bins and steps: shorter is a spike (loss_spike's business), not a trend.
DIVERGE_MIN_BINS = 8
DIVERGE_MIN_STEPS = 50
# The Theil-Sen line through the rise must climb at least 15% (and 0.1 nats): noise on a plateau
# makes min-to-max gaps, but its robust slope stays near zero.
DIVERGE_MIN_RISE = 0.15
DIVERGE_MIN_NATS = 0.1
# Mann-Kendall z over the rise's bins: 3 is one-sided p ~ 0.001.
DIVERGE_MK_Z = 3.0
# The grad norm "grows" when its Theil-Sen line over the same stretch gains 1.5x with z >= 2.
GRAD_GROWTH = 1.5
GRAD_MK_Z = 2.0

# --- loss spikes: a step this many times the median of the window before it, and 0.5 nats over it.
SPIKE_RATIO = 1.5
SPIKE_MIN_JUMP = 0.5  # nats: noise at a tiny loss is not a spike

# --- stalled: the loss at the end is within 2% of the start (medians of the first/last tenth), or
# within 10% and the bins show no significant downward trend (Mann-Kendall z > -3): noise alone
# moves a plateau's tenth-medians by a few percent either way.
STALL_KEEP = 0.98
STALL_NOISY_KEEP = 0.90
STALL_MK_Z = -3.0
STALL_MIN_STEPS = 40

# --- overfitting: val loss this far above its best, over at least this many evals after it.
OVERFIT_RISE = 0.02
OVERFIT_MIN_EVALS_AFTER = 3

# --- clipping saturated: this fraction of the steps in a window of the run clipped.
CLIPPED_MOST = 0.9
CLIP_MIN_STEPS = 20


def _rise(bins: list[tuple[int, float]]) -> tuple[int, int] | None:
    """(start, end) bin indices of the largest rise from a running minimum of the smoothed curve."""
    smooth = rolling_median([v for _, v in bins], DIVERGE_SMOOTH)
    best: tuple[float, int, int] | None = None
    low = 0
    for i, value in enumerate(smooth):
        if value < smooth[low]:
            low = i
        long_enough = i - low >= DIVERGE_MIN_BINS and bins[i][0] - bins[low][0] >= DIVERGE_MIN_STEPS
        if long_enough and smooth[low] > 0 and (best is None or value / smooth[low] > best[0]):
            best = (value / smooth[low], low, i)
    return None if best is None else (best[1], best[2])


def _fitted_growth(segment: list[tuple[int, float]]) -> tuple[float, float]:
    """(factor the Theil-Sen line of log values gains over the segment, Mann-Kendall z)."""
    pts = [(s, math.log(v)) for s, v in segment if v > 0]
    if len(pts) < 3:
        return 1.0, 0.0
    slope = theil_sen_slope([s for s, _ in pts], [v for _, v in pts])
    return math.exp(slope * (pts[-1][0] - pts[0][0])), mann_kendall_z([v for _, v in pts])


def _median_between(points: list[tuple[int, float]], first: int, last: int) -> float:
    vals = [v for s, v in points if first <= s <= last]
    return statistics.median(vals) if vals else math.nan


def diverging(run: Run) -> list[Finding]:
    losses = run.series("loss", trained_only=True)
    if len(losses) < 2 * DIVERGE_MIN_BINS:
        return []
    bins = bin_medians(losses, DIVERGE_BINS)
    found = _rise(bins)
    if found is None:
        return []
    lo, hi = found
    segment = bins[lo:hi + 1]
    growth, z = _fitted_growth(segment)
    start_step, end_step = segment[0][0], segment[-1][0]
    smooth = rolling_median([v for _, v in bins], DIVERGE_SMOOTH)
    rise_nats = smooth[hi] - smooth[lo]
    if growth - 1 < DIVERGE_MIN_RISE or z < DIVERGE_MK_Z or rise_nats < DIVERGE_MIN_NATS:
        return []
    norms = [p for p in run.series("grad_norm", trained_only=True) if start_step <= p[0] <= end_step]
    grad_growth, grad_z = _fitted_growth(bin_medians(norms, DIVERGE_BINS)) if norms else (1.0, 0.0)
    grad_grows = grad_growth >= GRAD_GROWTH and grad_z >= GRAD_MK_Z
    clipped = [r for r in run.steps if start_step <= r["step"] <= end_step and not r.get("skipped")]
    clipped_frac = sum(1 for r in clipped if r.get("clipped")) / max(1, len(clipped))
    final = statistics.median(v for _, v in losses[-max(1, len(losses) // 20):])
    evidence: dict[str, Any] = {
        "loss_min": smooth[lo], "loss_min_step": start_step, "loss_peak": smooth[hi], "peak_step": end_step,
        "fitted_rise": growth, "mann_kendall_z": z, "loss_final": final,
        "grad_norm_start": _median_between(norms, start_step, start_step + (end_step - start_step) // 10),
        "grad_norm_end": _median_between(norms, end_step - (end_step - start_step) // 10, end_step),
        "grad_norm_growth": grad_growth, "grad_mann_kendall_z": grad_z, "clipped_fraction": clipped_frac,
    }
    evidence |= _val_evidence(run, start_step, end_step)
    summary = (f"training loss rose from {smooth[lo]:.3g} at step {start_step} to {smooth[hi]:.3g} at step {end_step} "
               f"(+{growth - 1:.0%} on a robust trend line)")
    summary += (f" while the grad norm grew {grad_growth:.1f}x: the run is diverging" if grad_grows
                else "; the grad norm did not grow with it")
    if clipped_frac >= CLIPPED_MOST and get(run.spec, "stabilization.clip.mode") == "adaptive":
        summary += f"; {clipped_frac:.0%} of those steps were clipped by an adaptive threshold that followed the norm up"
    growing_layers = _layers_growing(run, start_step, end_step)
    if growing_layers:
        evidence["layer_grad_growth"] = growing_layers
    return [finding(run, "diverging", "critical" if grad_grows else "warning", summary, [start_step, end_step],
                    list(growing_layers), evidence, diverging_recs(run, norms, start_step))]


def _layers_growing(run: Run, first: int, last: int, top: int = 5) -> dict[str, float]:
    """Layers whose gradient norm grew most (>= GRAD_GROWTH) between the start and the end of a rise."""
    edge = max(1, (last - first) // 4)
    per_layer: dict[str, list[tuple[int, float]]] = {}
    for r in run.layers:
        if finite(r.get("grad_norm")):
            per_layer.setdefault(r["layer"], []).append((int(r["step"]), r["grad_norm"]))
    growth = {}
    for name, pts in per_layer.items():
        before = _median_between(pts, first - edge, first + edge)
        after = _median_between(pts, last - edge, last)
        if finite(before) and finite(after) and before > 0 and after / before >= GRAD_GROWTH:
            growth[name] = after / before
    return dict(sorted(growth.items(), key=lambda kv: -kv[1])[:top])


def _val_evidence(run: Run, first: int, last: int) -> dict[str, Any]:
    vals = [(s, v) for s, v in run.series("val_loss") if first <= s <= last]
    if len(vals) < 2:
        return {}
    return {"val_loss_start": vals[0][1], "val_loss_end": vals[-1][1]}


def diverging_recs(run: Run, norms: list[tuple[int, float]], start_step: int) -> list[Rec]:
    """Lower the rate (to what the engine's rollbacks found stable, if less), fix the threshold, warm up longer."""
    spec = run.spec
    lr_scales = [e["data"]["lr_scale"] for e in run.events_of("lr_lowered") if finite((e.get("data") or {}).get("lr_scale"))]
    factor = min([0.3, *lr_scales])
    recs = [lower_lr(spec, factor, "a rising loss with a growing gradient is the signature of too high a rate"
                     + (f"; the engine's rollbacks had to cut it to x{min(lr_scales):g}" if lr_scales else ""))]
    healthy = [v for s, v in run.series("grad_norm", trained_only=True) if s <= start_step][-SPIKE_WINDOW * 5:]
    reference = statistics.median(healthy) if healthy else (statistics.median(v for _, v in norms) if norms else 1.0)
    recs += clip_norm(spec, reference, "a fixed threshold at the healthy phase's grad norm bounds every update; "
                      "a threshold that follows the norm does not")
    recs.append(longer_warmup(spec, "a longer warm-up lets the optimizer statistics settle before full-size steps"))
    if get(spec, "model.arch") == "transformer":
        recs.append(rec("model.qk_norm", True, "QK-layernorm stops attention logits from growing without bound "
                        "(Dehghani et al. 2023, Wortsman et al. 2023)"))
    betas = get(spec, "training.betas")
    if get(spec, "training.optimizer") in ("adam", "adamw") and isinstance(betas, (list, tuple)) and betas[1] > 0.95:
        recs.append(rec("training.betas", [betas[0], 0.95], "a shorter second-moment memory (beta2 0.95) reacts to "
                        "growing gradients before the update does (Wortsman et al. 2023)"))
    return recs


def loss_spikes(run: Run) -> list[Finding]:
    losses = run.series("loss")
    spikes = jumps(losses, SPIKE_RATIO, SPIKE_MIN_JUMP)
    guard = guard_spikes(run, "loss", legacy_kind="loss")
    if not spikes and not guard:
        return []
    steps = sorted({s for s, _, _ in spikes} | {int(e["step"]) for e in guard if e.get("step") is not None})
    evidence: dict[str, Any] = {"spikes": len(steps), "guard_events": len(guard)}
    if spikes:
        worst = max(spikes, key=lambda s: s[1] / s[2])
        evidence |= {"worst_step": worst[0], "worst_loss": worst[1], "median_before": worst[2]}
        summary = f"{len(steps)} loss spike(s); worst at step {worst[0]}: {worst[1]:.4g} vs a recent median of {worst[2]:.4g}"
    else:
        summary = f"the engine's guard caught {len(guard)} loss spike(s), first at step {steps[0]}"
    top = attribution(guard)
    if top:
        evidence["attribution"] = top
        summary += f"; the worst batch rows start with {top[0].get('excerpt', '')[:40]!r}"
    recs = [lower_lr(run.spec, 0.5, "a lower learning rate makes one bad batch move the weights less")]
    if get(run.spec, "stabilization.clip.mode") in ("none", None):
        recs += clip_norm(run.spec, 1.0, "global-norm clipping bounds what one batch can do")
    if get(run.spec, "stabilization.on_explosion") in ("none", None):
        recs.append(rec("stabilization.on_explosion", "rollback",
                        "roll back to the last healthy state and lower the rate instead of carrying the damage"))
    recs.append(longer_warmup(run.spec, "a warm-up lets optimizer statistics settle before full-size steps"))
    return [finding(run, "loss_spike", "warning", summary, steps, [], evidence, recs)]


def stalled(run: Run) -> list[Finding]:
    losses = run.series("loss", trained_only=True)
    if len(losses) < STALL_MIN_STEPS or "diverging" in run.found:
        return []  # a loss that rose is diverging, not stalled
    tenth = max(5, len(losses) // 10)
    start = statistics.median(v for _, v in losses[:tenth])
    end = statistics.median(v for _, v in losses[-tenth:])
    if start <= 0 or end < STALL_NOISY_KEEP * start:
        return []
    trend = mann_kendall_z([v for _, v in bin_medians(losses, DIVERGE_BINS)])
    if end < STALL_KEEP * start and trend < STALL_MK_Z:
        return []
    spec = run.spec
    recs: list[Rec] = []
    ratios = layer_medians(run.layers, "update_ratio")
    if ratios and max(ratios.values()) < UPDATE_RATIO_LOW * 100:
        recs.append(rec("training.lr", round_sig(get(spec, "training.lr", 1e-3) * 3.0),
                        "updates are tiny compared with the weights: the rate is too low"))
    if get(spec, "model.activation") == "sigmoid":
        recs += to_relu(spec, "a plateau from the start often means saturated sigmoid units pass no gradient")
    recs += init_for_activation(spec)
    recs += add_norm(spec, "normalization keeps units in the range where they learn")
    return [finding(
        run, "stalled", "warning",
        f"loss barely moved: {start:.4g} at the start, {end:.4g} at the end",
        [losses[0][0], losses[-1][0]], [], {"loss_start": start, "loss_end": end, "mann_kendall_z": trend}, recs,
    )]


def overfitting(run: Run) -> list[Finding]:
    vals = run.series("val_loss")
    if len(vals) < OVERFIT_MIN_EVALS_AFTER + 2:
        return []
    best_i = min(range(len(vals)), key=lambda i: vals[i][1])
    best_step, best = vals[best_i]
    after = [v for _, v in vals[best_i + 1:]]
    if len(after) < OVERFIT_MIN_EVALS_AFTER or best <= 0:
        return []
    if statistics.median(after) < best * (1 + OVERFIT_RISE) or after[-1] < best * (1 + OVERFIT_RISE):
        return []
    losses = run.series("loss", trained_only=True)
    span = max(1, (vals[-1][0] - best_step) // 4)
    train_at_best = _median_between(losses, best_step - span, best_step + span)
    train_end = _median_between(losses, vals[-1][0] - span, vals[-1][0])
    if not (finite(train_at_best) and finite(train_end) and train_end < train_at_best):
        return []  # train loss rising too is divergence, not overfitting
    recs: list[Rec] = []
    dropout = get(run.spec, "model.dropout", 0.0) or 0.0
    recs.append(rec("model.dropout", round(min(0.5, dropout + 0.1), 2), "dropout keeps the net from memorizing the corpus"))
    if (get(run.spec, "training.weight_decay", 0.0) or 0.0) < 0.1:
        recs.append(rec("training.weight_decay", 0.1, "weight decay pulls weights that only fit the training text back"))
    if best_step >= (get(run.spec, "training.warmup_steps", 0) or 0) and best_step < get(run.spec, "training.max_steps", 0):
        recs.append(rec("training.max_steps", best_step, "stop where the validation loss was best (early stopping)"))
    return [finding(
        run, "overfitting", "warning",
        f"validation loss rose from its best {best:.4g} at step {best_step} to {vals[-1][1]:.4g} over "
        f"{len(after)} evals while the training loss fell {train_at_best:.4g} -> {train_end:.4g}: the model memorizes "
        "the training text; more data (a larger corpus) helps most",
        [best_step, vals[-1][0]], [],
        {"best_val_loss": best, "best_step": best_step, "last_val_loss": vals[-1][1], "evals_after_best": len(after),
         "train_loss_at_best": train_at_best, "train_loss_end": train_end},
        recs,
    )]


def _clip_window(n: int) -> int:
    """Steps per window: a tenth of the run, between 20 and 200 steps."""
    return max(CLIP_MIN_STEPS, min(200, n // 10))


def clipping_saturated(run: Run) -> list[Finding]:
    mode = get(run.spec, "stabilization.clip.mode")
    rows = [r for r in run.steps if not r.get("skipped") and not r.get("nonfinite")]
    if len(rows) < CLIP_MIN_STEPS or mode in ("none", None):
        return []
    window = _clip_window(len(rows))
    flags = [1 if r.get("clipped") else 0 for r in rows]
    prefix = [0]
    for f in flags:
        prefix.append(prefix[-1] + f)
    fractions = [(prefix[i + window] - prefix[i]) / window for i in range(len(rows) - window + 1)]
    saturated = [i for i, frac in enumerate(fractions) if frac >= CLIPPED_MOST]
    if not saturated:
        return []
    first, last = int(rows[saturated[0]]["step"]), int(rows[saturated[-1] + window - 1]["step"])
    norms = [(int(r["step"]), r["grad_norm"]) for r in rows if first <= r["step"] <= last and finite(r.get("grad_norm"))]
    growth, z = _fitted_growth(bin_medians(norms, DIVERGE_BINS))
    growing = growth >= GRAD_GROWTH and z >= GRAD_MK_Z
    overall = prefix[-1] / len(rows)
    summary = f"{overall:.0%} of steps were clipped ({max(fractions):.0%} of {window} steps from step {first})"
    if mode == "adaptive":
        summary += (f": the adaptive threshold followed the grad norm up {growth:.1f}x, so it bounded nothing"
                    if growing else ": an adaptive threshold that clips most steps tracks the norm instead of bounding it")
    elif growing:
        summary += f" while the grad norm grew {growth:.1f}x: the learning rate is too high for the threshold"
    else:
        summary += ": the threshold sits below the typical grad norm, so clipping only rescales every step"
    evidence = {"clipped_fraction": overall, "max_window_fraction": max(fractions), "window": window,
                "clip_mode": mode, "grad_norm_growth": growth, "clip_bursts": len(run.events_of("clip_burst"))}
    early = [v for _, v in run.series("grad_norm", trained_only=True)[:max(window, 50)]]
    reference = statistics.median(early) if early else 1.0
    recs: list[Rec] = []
    if growing or mode == "adaptive":
        recs.append(lower_lr(run.spec, 0.5, "a grad norm that keeps growing under clipping means the rate is too high"))
    if mode != "norm":
        recs += clip_norm(run.spec, reference, "a fixed global-norm threshold at the early grad norm bounds updates; "
                          "a threshold that moves with the norm does not")
    elif not growing:
        median = statistics.median(v for _, v in norms) if norms else reference
        recs.append(rec("stabilization.clip.max_norm", round_sig(median),
                        "a threshold at the typical grad norm clips outliers only, not every step"))
    # A fixed threshold under a steady norm only rescales each step (with Adam nearly a no-op): worth
    # knowing, not a health problem. A threshold that follows a growing norm hides instability.
    severity = "warning" if growing or mode == "adaptive" else "info"
    return [finding(run, "clipping_saturated", severity, summary, [first, last], [], evidence, recs)]
