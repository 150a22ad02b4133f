"""Gradient-health diagnosis: a pure function from recorded series to findings.

Each finding names its kind, severity, steps, layers, the numbers behind it
and actions a user can put in the next spec. Thresholds follow
../shared/STABILITY.md: orders of magnitude across depth for vanishing,
jumps over the run's own median for exploding, ~1e-3 update ratios as healthy.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

# A layer whose typical gradient is this far below the strongest layer's is vanishing.
VANISHING_RATIO = 1e-3
# Gradients this small carry no signal at all, whatever the other layers do.
VANISHING_ABS = 1e-7
# A step whose grad norm is this many times the median of the steps before it is an explosion.
EXPLODING_RATIO = 50.0
# Loss this many times the median of the preceding window is a spike.
SPIKE_RATIO = 1.5
SPIKE_MIN_JUMP = 0.5  # nats: noise at a tiny loss is not a spike
SPIKE_WINDOW = 20
# Healthy update-to-weight ratio is around 1e-3 (Karpathy); far outside means trouble.
UPDATE_RATIO_HIGH = 1e-1
UPDATE_RATIO_LOW = 1e-6
CLIPPED_MOST = 0.9

Finding = dict[str, Any]


def diagnose(
    steps: list[dict[str, Any]],
    layers: list[dict[str, Any]],
    events: list[dict[str, Any]] | None = None,
    spec: dict[str, Any] | None = None,
    activations: list[dict[str, Any]] | None = None,
) -> list[Finding]:
    """Findings for a run, most severe first; empty when the run looks healthy."""
    spec = spec or {}
    findings = [
        *_nonfinite(steps, spec),
        *_exploding(steps, spec),
        *_vanishing(layers, spec),
        *_loss_spikes(steps, spec),
        *_update_ratios(layers, spec),
        *_clipping_saturated(steps, spec),
        *_stalled(steps, layers, spec),
    ]
    order = {"critical": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: order[f["severity"]])


HEALTH_OF_SEVERITY = {"critical": "critical", "warning": "warning", "info": "ok"}


def health_of(findings: list[Finding]) -> str:
    """A run's health: the worst severity among its findings (ok when there are none)."""
    healths = {HEALTH_OF_SEVERITY.get(f["severity"], "ok") for f in findings}
    return next((h for h in ("critical", "warning") if h in healths), "ok")


def summarize(findings: list[Finding]) -> str:
    """One line per finding, for terminals and job records."""
    if not findings:
        return "healthy: no gradient problems found"
    return "\n".join(f"[{f['severity']}] {f['summary']}" for f in findings)


def _finding(kind: str, severity: str, summary: str, steps: list[int], layers: list[str],
             evidence: dict[str, Any], recommendations: list[dict[str, Any]]) -> Finding:
    return {
        "kind": kind,
        "severity": severity,
        "summary": summary,
        "steps": {"first": min(steps), "last": max(steps)} if steps else None,
        "layers": layers,
        "evidence": evidence,
        "recommendations": recommendations,
    }


def _rec(field: str, value: Any, why: str) -> dict[str, Any]:
    return {"field": field, "value": value, "why": why}


def _get(spec: dict[str, Any], path: str, default: Any = None) -> Any:
    node: Any = spec
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _clip_recs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    recs = []
    if _get(spec, "stabilization.clip.mode", "none") in ("none", None):
        recs.append(_rec("stabilization.clip", {"mode": "norm", "max_norm": 1.0},
                         "global-norm clipping bounds every update, whatever the gradient does"))
    else:
        recs.append(_rec("stabilization.clip.max_norm", 0.5,
                         "a tighter threshold limits how far one bad batch moves the weights"))
    return recs


def _lr_rec(spec: dict[str, Any], factor: float = 0.3) -> dict[str, Any]:
    lr = _get(spec, "training.lr")
    value = round(lr * factor, 8) if _finite(lr) else f"x{factor}"
    return _rec("training.lr", value, "a lower learning rate shrinks every step; too high a rate is the usual cause")


def _nonfinite(steps: list[dict[str, Any]], spec: dict[str, Any]) -> list[Finding]:
    bad = [r["step"] for r in steps if r.get("nonfinite")]
    if not bad:
        return []
    skipped = sum(1 for r in steps if r.get("skipped"))
    recs = [*_clip_recs(spec), _lr_rec(spec)]
    if _get(spec, "stabilization.precision") == "fp16":
        recs.append(_rec("stabilization.precision", "bf16", "bf16 has fp32's range, so activations cannot overflow"))
    if _get(spec, "model.arch") in ("rnn",):
        recs.append(_rec("model.arch", "lstm", "gated recurrences keep the signal bounded over long sequences"))
    return [_finding(
        "nonfinite", "critical",
        f"loss or gradient became NaN/inf on {len(bad)} step(s), first at step {bad[0]}",
        bad, [], {"nonfinite_steps": len(bad), "first_step": bad[0], "skipped_steps": skipped}, recs,
    )]


def _exploding(steps: list[dict[str, Any]], spec: dict[str, Any]) -> list[Finding]:
    norms = [(r["step"], r["grad_norm"]) for r in steps if _finite(r.get("grad_norm"))]
    # Early steps have large norms by nature, so each step is judged against the steps before it.
    spikes = _jumps(norms, EXPLODING_RATIO)
    nonfinite = any(r.get("nonfinite") for r in steps)
    if not spikes and not nonfinite:
        return []
    if spikes:
        peak_step, peak, median = max(spikes, key=lambda s: s[1] / s[2])
        summary = (f"gradient norm exploded to {peak:.3g} at step {peak_step} "
                   f"({peak / median:.0f}x the median {median:.3g} of the {SPIKE_WINDOW} steps before)")
    else:
        # Divergence straight to NaN is an explosion too; report the largest finite norm seen.
        peak_step, peak = max(norms, key=lambda sn: sn[1]) if norms else (steps[0]["step"], math.nan)
        median = statistics.median(n for _, n in norms) if norms else math.nan
        summary = f"gradients diverged to non-finite values; largest finite grad norm {peak:.3g} at step {peak_step}"
    recs = [*_clip_recs(spec), _lr_rec(spec)]
    if _get(spec, "model.init") in ("normal",) and (_get(spec, "model.init_std") or 0) > 0.05:
        recs.append(_rec("model.init", "xavier_uniform", "large initial weights amplify the signal at every layer or time step"))
    if _get(spec, "model.arch") in ("rnn", "gru", "lstm") and _get(spec, "model.recurrent_init") != "orthogonal":
        recs.append(_rec("model.recurrent_init", "orthogonal", "orthogonal recurrent weights keep the spectral radius at 1"))
    if _get(spec, "stabilization.weight_max_norm") is None:
        recs.append(_rec("stabilization.weight_max_norm", 3.0, "a max-norm constraint caps how large weights can grow"))
    return [_finding(
        "exploding", "critical", summary, [s[0] for s in spikes] or [peak_step], [],
        {"peak_grad_norm": peak, "peak_step": peak_step, "median_before": median,
         "spike_steps": len(spikes), "nonfinite": nonfinite},
        recs,
    )]


def _layer_medians(layers: list[dict[str, Any]], key: str) -> dict[str, float]:
    series: dict[str, list[float]] = defaultdict(list)
    for row in layers:
        value = row.get(key)
        if _finite(value):
            series[row["layer"]].append(value)
    return {name: statistics.median(vals) for name, vals in series.items() if vals}


def _layer_order(layers: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in layers:
        seen.setdefault(row["layer"], None)
    return list(seen)


def _is_embedding(name: str) -> bool:
    # Embedding rows get gradient only for the tokens in the batch: weak by nature, not by depth.
    return "emb" in name


def _vanishing(layers: list[dict[str, Any]], spec: dict[str, Any]) -> list[Finding]:
    medians = {n: v for n, v in _layer_medians(layers, "grad_norm").items() if not _is_embedding(n)}
    if len(medians) < 2:
        return []
    order = [name for name in _layer_order(layers) if name in medians]
    strongest = max(medians.values())
    if strongest <= 0:
        return []
    weak = [n for n in order if medians[n] < VANISHING_RATIO * strongest or medians[n] < VANISHING_ABS]
    if not weak:
        return []
    steps = [r["step"] for r in layers if r["layer"] in weak]
    weakest = min(weak, key=lambda n: medians[n])
    recs = []
    activation = _get(spec, "model.activation")
    if activation in ("sigmoid", "tanh", None):
        recs.append(_rec("model.activation", "relu",
                         "sigmoid/tanh derivatives are at most 0.25/1 and vanish when saturated; ReLU passes gradient unchanged"))
    init = _get(spec, "model.init")
    if activation in ("relu", "leaky_relu", "gelu", "silu", "elu") or activation is None or activation == "sigmoid":
        if init != "kaiming_normal":
            recs.append(_rec("model.init", "kaiming_normal", "He init keeps the signal's variance constant through ReLU layers"))
    elif init not in ("xavier_uniform", "xavier_normal"):
        recs.append(_rec("model.init", "xavier_uniform", "Xavier init keeps the variance constant through tanh layers"))
    if not _get(spec, "model.residual", False):
        recs.append(_rec("model.residual", True, "residual connections give gradients a direct path to early layers"))
    if _get(spec, "model.norm", "none") == "none":
        norm = "batchnorm" if _get(spec, "model.arch") == "mlp" else "layernorm"
        recs.append(_rec("model.norm", norm, "normalization keeps pre-activations out of the saturated range"))
    n_layers = _get(spec, "model.n_layers")
    if isinstance(n_layers, int) and n_layers > 4:
        recs.append(_rec("model.n_layers", max(2, n_layers // 2), "fewer layers means fewer factors shrinking the gradient"))
    return [_finding(
        "vanishing", "critical" if len(weak) > 1 else "warning",
        f"{len(weak)} layer(s) get gradients {strongest / max(medians[weakest], 1e-30):.1e}x weaker than the strongest layer (weakest: {weakest})",
        steps, weak,
        {"median_grad_norm": {n: medians[n] for n in order}, "strongest": strongest,
         "ratio_threshold": VANISHING_RATIO},
        recs,
    )]


def _jumps(points: list[tuple[int, float]], ratio: float, min_jump: float = 0.0) -> list[tuple[int, float, float]]:
    """(step, value, median) where a value exceeds ratio x (and min_jump over) the median of the window before it."""
    jumps = []
    for i in range(SPIKE_WINDOW, len(points)):
        median = statistics.median(v for _, v in points[i - SPIKE_WINDOW:i])
        step, value = points[i]
        if median > 0 and value > ratio * median and value - median > min_jump:
            jumps.append((step, value, median))
    return jumps


def _loss_spikes(steps: list[dict[str, Any]], spec: dict[str, Any]) -> list[Finding]:
    losses = [(r["step"], r["loss"]) for r in steps if _finite(r.get("loss"))]
    spikes = _jumps(losses, SPIKE_RATIO, SPIKE_MIN_JUMP)
    if not spikes:
        return []
    worst = max(spikes, key=lambda s: s[1] / s[2])
    recs = [_lr_rec(spec, 0.5), *_clip_recs(spec)]
    if _get(spec, "stabilization.on_explosion") in ("none", None):
        recs.append(_rec("stabilization.on_explosion", "rollback", "roll back to the last healthy state and lower the rate instead of carrying the damage"))
    if (_get(spec, "training.warmup_steps") or 0) == 0:
        recs.append(_rec("training.warmup_steps", 100, "a warm-up lets optimizer statistics settle before full-size steps"))
    return [_finding(
        "loss_spike", "warning",
        f"{len(spikes)} loss spike(s); worst at step {worst[0]}: {worst[1]:.4g} vs a recent median of {worst[2]:.4g}",
        [s[0] for s in spikes], [],
        {"spikes": len(spikes), "worst_step": worst[0], "worst_loss": worst[1], "median_before": worst[2]},
        recs,
    )]


def _update_ratios(layers: list[dict[str, Any]], spec: dict[str, Any]) -> list[Finding]:
    medians = _layer_medians(layers, "update_ratio")
    high = sorted(n for n, v in medians.items() if v > UPDATE_RATIO_HIGH)
    if not high:
        return []
    steps = [r["step"] for r in layers if r["layer"] in high]
    return [_finding(
        "update_ratio_high", "warning",
        f"{len(high)} layer(s) change by more than {UPDATE_RATIO_HIGH:g} of their norm per step (healthy is about 1e-3)",
        steps, high, {"median_update_ratio": {n: medians[n] for n in high}},
        [_lr_rec(spec, 0.3)],
    )]


def _clipping_saturated(steps: list[dict[str, Any]], spec: dict[str, Any]) -> list[Finding]:
    rows = [r for r in steps if not r.get("nonfinite")]
    if len(rows) < 20 or _get(spec, "stabilization.clip.mode") in ("none", None):
        return []
    clipped = sum(1 for r in rows if r.get("clipped"))
    fraction = clipped / len(rows)
    if fraction < CLIPPED_MOST:
        return []
    return [_finding(
        "clipping_saturated", "warning",
        f"{fraction:.0%} of steps were clipped: the threshold or the learning rate is off",
        [r["step"] for r in rows if r.get("clipped")], [],
        {"clipped_fraction": fraction, "steps": len(rows)},
        [_lr_rec(spec, 0.5), _rec("stabilization.clip.mode", "adaptive",
                                 "an adaptive threshold follows the run's own grad-norm scale")],
    )]


def _stalled(steps: list[dict[str, Any]], layers: list[dict[str, Any]], spec: dict[str, Any]) -> list[Finding]:
    losses = [(r["step"], r["loss"]) for r in steps if _finite(r.get("loss"))]
    if len(losses) < 40:
        return []
    tenth = max(5, len(losses) // 10)
    start = statistics.median(v for _, v in losses[:tenth])
    end = statistics.median(v for _, v in losses[-tenth:])
    if start <= 0 or end < 0.98 * start:
        return []
    recs = []
    ratios = _layer_medians(layers, "update_ratio")
    if ratios and max(ratios.values()) < UPDATE_RATIO_LOW * 100:
        recs.append(_lr_rec(spec, 3.0) | {"why": "updates are tiny compared with the weights: the rate is too low"})
    recs.append(_rec("model.activation", "relu", "a plateau from the start often means saturated units pass no gradient"))
    recs.append(_rec("model.init", "kaiming_normal", "a well-scaled init starts the net where gradients flow"))
    return [_finding(
        "stalled", "warning",
        f"loss barely moved: {start:.4g} at the start, {end:.4g} at the end",
        [losses[0][0], losses[-1][0]], [],
        {"loss_start": start, "loss_end": end},
        recs,
    )]
