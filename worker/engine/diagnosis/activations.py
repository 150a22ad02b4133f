"""Activation findings: saturated and dead units, vanishing through time, attention logit growth.

They read the activation rows (one per site and recorded step, see the
engine's on_activation_stats), judging each site by its later half of records:
what the net looks like now, not at initialization.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from .core import Finding, Run, finding, first_step_over, late_half
from .spec import RECURRENT, Rec, add_norm, get, longer_warmup, lower_lr, rec, round_sig, to_relu
from .stats import bin_medians, finite, mann_kendall_z, theil_sen_slope

# Saturation: outputs near tanh/sigmoid limits pass almost no gradient (derivative < 0.06 there).
# Xavier init with tanh's gain 5/3 keeps pre-activations at std ~1.67 by design, which already puts
# ~21% of outputs past |a| > 0.97 (measured 21-31% on healthy real runs); pre-activations at 2.5x unit
# scale reach 40%, and a large init drives 80%. So: warn at 40%, critical at 60%.
SATURATED_WARN = 0.4
SATURATED_CRITICAL = 0.6
# Dead units: a ReLU unit negative for a whole batch gets no gradient; a quarter of a layer dead is
# capacity lost, half is a layer that barely learns. Smooth relatives (gelu, silu, elu, leaky) still
# pass some gradient below 0, so they are judged at the critical line only.
DEAD_WARN = 0.25
DEAD_CRITICAL = 0.5
HARD_RELU = ("relu",)

# Vanishing through time (Pascanu et al. 2013: the gradient is a product of per-step Jacobians).
# From ||dL_last/dh_t|| at five positions we fit the per-step decay factor rho (Theil-Sen on log norm
# vs lag). Flag a site when both hold:
#  - the first position of the window gets < 1e-3 of the last one's gradient (the same three orders
#    of magnitude as vanishing across depth): the window is longer than what the net can learn from;
#  - rho < 0.7: the signal halves in under two steps, so it is the recurrence, not just a long window.
# Measured at init on random inputs (hidden 64, windows of 64 and 128): tanh RNN with recurrent
# weights x0.1 rho < 0.25, torch-default tanh RNN ~0.5, LSTM forget bias 0 ~0.62, GRU ~0.64,
# orthogonal tanh RNN ~0.79, LSTM forget bias 1 ~0.83. Real runs move these; calibrate here.
VTT_FLOOR = 1e-3
VTT_RHO = 0.7
VTT_RHO_CRITICAL = 0.5
# Gated cells (gru, lstm) are judged one severity lower: their gates are learned, and a trained gate
# that forgets fast can be the data's short dependencies as much as a gradient that cannot get through
# (a default GRU trained on text measured rho 0.55-0.92 across its run while its loss fell like the
# transformer's). An ungated tanh/relu RNN has no such gate: its decay is the vanishing gradient of
# Bengio et al. 1994 and Pascanu et al. 2013.
GATED = ("gru", "lstm")
# A norm of exactly 0 underflowed: it is below the smallest normal float32.
TINY = 1e-38

# Attention logits: softmax at a logit gap of 50 is one-hot to float precision (e^-50 ~ 2e-22), so the
# head's attention has collapsed; Dehghani et al. 2023 (ViT-22B) and Wortsman et al. 2023 saw training
# diverge as max attention logits grow, fixed by QK-layernorm.
ATTN_LOGIT_BOUND = 50.0
# Growth alone is learning: heads that learn to attend sharpen. Healthy real runs of the default
# transformer (2x64, 4 heads, on the 150 KB corpus) took the max logit from ~2 at init to 11 (lr 1e-3),
# 18-22 (lr 3e-3 cosine) and 25 (lr 1e-2, no warm-up) while the loss fell all along; the unstable run
# (no norms, lr 3e-2) reached 4.5e5. So growth is flagged below the bound only as the instability
# Wortsman et al. describe: the Theil-Sen line of log max-logit gains 2x over the run (Mann-Kendall
# z >= 3), ends above 10, and the training loss over the later half of the site's records no longer
# falls (its Mann-Kendall z over bin medians is above -3): the logits grow while learning has stopped.
ATTN_GROWTH = 2.0
ATTN_GROWTH_MIN = 10.0
ATTN_MK_Z = 3.0
# "Still learning" (still_learning): the training loss's Mann-Kendall z over 20 bin medians of the later
# half of a site's records is -3 or less (one-sided p ~ 0.001 that it falls).
LOSS_FALLING_Z = -3.0
LOSS_BINS = 20


def loss_trend_z(run: Run, first: int, last: int) -> float | None:
    """Mann-Kendall z of the training loss's bin medians between two steps; None with too few steps.
    Sites recorded on the same steps share one window: computed once per diagnosis."""
    key = ("loss_trend_z", first, last)
    if key not in run.memo:
        losses = [p for p in run.series("loss", trained_only=True) if first <= p[0] <= last]
        run.memo[key] = (None if len(losses) < LOSS_BINS // 2
                         else mann_kendall_z([v for _, v in bin_medians(losses, LOSS_BINS)]))
    return run.memo[key]


def site_loss_trend_z(run: Run, pts: list[tuple[int, float]]) -> float | None:
    """The training loss's trend (loss_trend_z) over the later half of a site's records."""
    return loss_trend_z(run, pts[len(pts) // 2][0], pts[-1][0])


def still_learning(run: Run, pts: list[tuple[int, float]]) -> bool:
    """True when the training loss still falls significantly over the later half of a site's records.

    An activation finding past its critical line is critical only where this is False: a net that keeps
    learning with saturated units, dead units or collapsed heads is at risk and learns less than it
    could (warning), one that has stopped learning that way is failing now (critical). Real runs: the
    4x128 no-norm tanh transformer kept 63% of its MLP units saturated and logits near 300 while its
    val loss fell to 0.59; at lr 0.1 the loss sat at 3.1 with logits ~3e5."""
    loss_z = site_loss_trend_z(run, pts)
    return loss_z is not None and loss_z <= LOSS_FALLING_Z


def _site_levels(run: Run, key: str) -> dict[str, tuple[float, list[tuple[int, float]]]]:
    """Per site: (median of its later half of records, all its (step, value))."""
    return {site: (statistics.median(late_half(pts)), pts) for site, pts in run.sites(key).items()}


def saturated(run: Run) -> list[Finding]:
    levels = {s: lv for s, lv in _site_levels(run, "saturated_frac").items() if lv[0] >= SATURATED_WARN}
    if not levels:
        return []
    sites = list(levels)
    worst = max(lv[0] for lv in levels.values())
    first = min(first_step_over(pts, SATURATED_WARN) or pts[0][0] for _, pts in levels.values())
    last = max(pts[-1][0] for _, pts in levels.values())
    critical = any(level >= SATURATED_CRITICAL and not still_learning(run, pts) for level, pts in levels.values())
    return [finding(
        run, "saturated", "critical" if critical else "warning",
        f"{len(sites)} site(s) have {worst:.0%} of their outputs saturated (near the activation's limits, where it "
        f"passes almost no gradient): {', '.join(sites[:4])}",
        [first, last], sites,
        {"saturated_frac": {s: lv[0] for s, lv in levels.items()}, "threshold": SATURATED_WARN},
        saturation_recs(run),
    )]


def smaller_init(spec: dict[str, Any], why: str) -> list[Rec]:
    """Halve the init scale: init_std for normal init, init_gain for the gain-based schemes."""
    init = get(spec, "model.init", "default")
    if init == "normal":
        return [rec("model.init_std", round_sig(get(spec, "model.init_std", 0.02) / 2), why)]
    if init in ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal"):
        return [rec("model.init_gain", round_sig(get(spec, "model.init_gain", 1.0) / 2), why)]
    return []


def saturation_recs(run: Run) -> list[Rec]:
    spec = run.spec
    recs = smaller_init(spec, "smaller initial weights keep pre-activations in the range where the unit has slope")
    recs += add_norm(spec, "normalization re-centres pre-activations before the activation saturates them")
    if get(spec, "model.arch") == "rnn":
        recs.append(rec("model.arch", "lstm", "a gated cell keeps its state bounded without saturating the output"))
    else:
        recs += to_relu(spec, "ReLU-family activations do not saturate for positive inputs")
    return recs


def dead_units(run: Run) -> list[Finding]:
    kinds = run.site_kinds()
    levels = {}
    for site, (level, pts) in _site_levels(run, "dead_frac").items():
        line = DEAD_WARN if kinds.get(site) in HARD_RELU else DEAD_CRITICAL
        if level >= line:
            levels[site] = (level, pts, line)
    if not levels:
        return []
    worst = max(lv[0] for lv in levels.values())
    first = min(first_step_over(pts, line) or pts[0][0] for _, pts, line in levels.values())
    last = max(pts[-1][0] for _, pts, _ in levels.values())
    spec = run.spec
    recs: list[Rec] = []
    if get(spec, "model.activation") == "relu":
        recs.append(rec("model.activation", "leaky_relu", "a small negative slope lets dead units recover"))
    recs.append(lower_lr(spec, 0.5, "large steps push units into the region where they never fire again"))
    recs += add_norm(spec, "normalization keeps pre-activations centred so units keep firing")
    init = get(spec, "model.init")
    if init not in ("kaiming_normal", "kaiming_uniform"):
        recs.append(rec("model.init", "kaiming_normal", "He init starts ReLU units with balanced pre-activations"))
    critical = any(level >= DEAD_CRITICAL and not still_learning(run, pts) for level, pts, _ in levels.values())
    return [finding(
        run, "dead_units", "critical" if critical else "warning",
        f"{len(levels)} site(s) have up to {worst:.0%} dead units (never active over a batch, so they get no gradient)",
        [first, last], list(levels),
        {"dead_frac": {s: lv[0] for s, lv in levels.items()}, "threshold": DEAD_WARN}, recs,
    )]


def decay_per_step(grad_time: list[list[float]]) -> tuple[float, float] | None:
    """(rho, total decay first/last) from [[t, norm], ...]; rho = per-step factor of the gradient norm.

    rho is the Theil-Sen slope of log norm against the lag from the last position, over the norms
    that did not underflow to 0. When only the last one is left, the nearest underflowed position
    bounds rho from above (the true norm there is below the smallest float).
    """
    pts = sorted((int(t), float(n)) for t, n in grad_time if finite(n) and n >= 0)
    if len(pts) < 2 or pts[-1][1] <= 0:
        return None
    last_t, last = pts[-1]
    total = max(pts[0][1], TINY) / last
    alive = [(last_t - t, math.log(n)) for t, n in pts if n > 0]
    if len(alive) >= 2:
        slope = theil_sen_slope([lag for lag, _ in alive], [v for _, v in alive])
    else:
        nearest_t = max(t for t, _ in pts[:-1])
        slope = (math.log(TINY) - math.log(last)) / (last_t - nearest_t)
    return math.exp(min(slope, 0.0)), total


def vanishing_through_time(run: Run) -> list[Finding]:
    flagged: dict[str, dict[str, Any]] = {}
    per_site: dict[str, list[tuple[int, float, float]]] = {}
    for row in run.activations:
        grad_time = row.get("grad_time")
        fit = decay_per_step(grad_time) if grad_time else None
        if fit is not None:
            per_site.setdefault(row["site"], []).append((int(row.get("step") or 0), *fit))
    for site, records in per_site.items():
        late = records[len(records) // 2:] or records
        rho = statistics.median(r[1] for r in late)
        total = statistics.median(r[2] for r in late)
        if total < VTT_FLOOR and rho < VTT_RHO:
            first = next(s for s, r, d in records if d < VTT_FLOOR and r < VTT_RHO) if any(
                d < VTT_FLOOR and r < VTT_RHO for _, r, d in records) else records[0][0]
            flagged[site] = {"rho": rho, "total_decay": total, "first": first, "last": records[-1][0],
                             "horizon": math.log(VTT_FLOOR) / math.log(rho) if 0 < rho < 1 else math.inf}
    if not flagged:
        return []
    worst_rho = min(f["rho"] for f in flagged.values())
    horizon = min(f["horizon"] for f in flagged.values())
    gated = get(run.spec, "model.arch") in GATED
    severity = "critical" if worst_rho < VTT_RHO_CRITICAL else "warning"
    if gated:
        severity = "warning" if severity == "critical" else "info"
    return [finding(
        run, "vanishing_through_time", severity,
        f"the gradient through the recurrence shrinks by x{worst_rho:.2f} per time step, so it falls below "
        f"{VTT_FLOOR:g} of its size within ~{horizon:.0f} steps: tokens earlier than that teach the net nothing"
        + (" (the gates set this reach: fine if the text needs no longer memory)" if gated else ""),
        [min(f["first"] for f in flagged.values()), max(f["last"] for f in flagged.values())], list(flagged),
        {"decay_per_step": {s: f["rho"] for s, f in flagged.items()},
         "grad_time_ratio": {s: f["total_decay"] for s, f in flagged.items()},
         "horizon_steps": horizon, "rho_threshold": VTT_RHO, "floor": VTT_FLOOR},
        through_time_recs(run, horizon),
    )]


def through_time_recs(run: Run, horizon: float) -> list[Rec]:
    spec = run.spec
    arch = get(spec, "model.arch")
    recs: list[Rec] = []
    if arch in ("rnn", "gru"):
        recs.append(rec("model.arch", "lstm", "an LSTM's additive cell state carries gradient across many steps"))
    if arch in RECURRENT:
        recs.append(rec("model.recurrent_init", "orthogonal",
                        "orthogonal recurrent weights keep the per-step Jacobian's spectral radius near 1"))
    if arch in ("rnn", "gru", "lstm") and (get(spec, "model.forget_bias", 0.0) or 0.0) < 1.0:
        recs.append(rec("model.forget_bias", 1.0, "an LSTM forget-gate bias of 1 keeps the cell state (and its "
                        "gradient) from decaying at the start (Jozefowicz et al. 2015)"))
    seq_len = get(spec, "training.seq_len")
    if isinstance(seq_len, int) and math.isfinite(horizon) and seq_len > 2 * horizon:
        recs.append(rec("training.seq_len", max(2, int(2 * horizon)),
                        f"the gradient reaches ~{horizon:.0f} steps back: context past twice that is context the net "
                        "does not learn to use, and a shorter window makes every step cheaper"))
    return recs


def attention_logit_growth(run: Run) -> list[Finding]:
    flagged: dict[str, dict[str, Any]] = {}
    for site, pts in run.sites("attn_max_logit").items():
        level = statistics.median(v for _, v in pts[-3:])
        positive = [(s, math.log(v)) for s, v in pts if v > 0]
        growth, z = 1.0, 0.0
        if len(positive) >= 4:
            slope = theil_sen_slope([s for s, _ in positive], [v for _, v in positive])
            growth = math.exp(slope * (positive[-1][0] - positive[0][0]))
            z = mann_kendall_z([v for _, v in positive])
        loss_z = site_loss_trend_z(run, pts)  # for the evidence; still_learning reads the same memoised value
        learning = still_learning(run, pts)
        grows = growth >= ATTN_GROWTH and z >= ATTN_MK_Z and level >= ATTN_GROWTH_MIN and not learning
        if level >= ATTN_LOGIT_BOUND or grows:
            line = ATTN_LOGIT_BOUND if level >= ATTN_LOGIT_BOUND else ATTN_GROWTH_MIN
            flagged[site] = {"level": level, "growth": growth, "z": z, "loss_z": loss_z, "still_learning": learning,
                             "first": first_step_over(pts, line) or pts[0][0], "last": pts[-1][0]}
    if not flagged:
        return []
    worst = max(f["level"] for f in flagged.values())
    # critical: past twice the bound where the loss has stopped falling (still_learning)
    critical = any(f["level"] >= 2 * ATTN_LOGIT_BOUND and not f["still_learning"] for f in flagged.values())
    evidence: dict[str, Any] = {
        "attn_max_logit": {s: f["level"] for s, f in flagged.items()},
        "growth": {s: f["growth"] for s, f in flagged.items()}, "bound": ATTN_LOGIT_BOUND,
        # the training loss's trend while the logits grew (Mann-Kendall z; <= -3 would be still falling)
        "loss_trend_z": {s: f["loss_z"] for s, f in flagged.items()},
    }
    entropy = {s: pts[-1][1] for s, pts in run.sites("attn_entropy").items() if s in flagged}
    if entropy:
        evidence["attn_entropy"] = entropy
    z_lse = next(iter(run.sites("z_lse").values()), None)  # the output site: log Z drifting away from 0
    if z_lse:
        evidence["z_lse_start"], evidence["z_lse_end"] = z_lse[0][1], z_lse[-1][1]
    spec = run.spec
    recs: list[Rec] = []
    if get(spec, "model.arch") == "transformer":
        recs.append(rec("model.qk_norm", True, "QK-layernorm bounds attention logits (Dehghani et al. 2023)"))
    recs.append(lower_lr(spec, 0.5, "attention logit growth is an instability of too high a rate "
                         "(Wortsman et al. 2023)"))
    recs.append(longer_warmup(spec, "a longer warm-up delays logit growth until the optimizer statistics settle"))
    return [finding(
        run, "attention_logit_growth", "critical" if critical else "warning",
        f"attention logits grew to {worst:.3g} in {len(flagged)} site(s); large logits make attention one-hot and "
        "precede divergence",
        [min(f["first"] for f in flagged.values()), max(f["last"] for f in flagged.values())], list(flagged),
        evidence, recs,
    )]
