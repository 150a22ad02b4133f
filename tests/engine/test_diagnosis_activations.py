"""Activation findings on synthetic activation rows: each with a positive and a negative twin."""

from __future__ import annotations

import pytest

from tests.engine.diagnosis_series import decreasing, kinds, noisy, only, steps
from worker.engine.diagnosis import diagnose, health_of

STEPS = steps(decreasing(200))  # the loss still falls at steps 40-100, where the sites' later records are
STALLED = steps(noisy([2.0] * 200, 0.02))  # it has stopped falling


def rows(site: str, kind: str, values: dict[str, list], every: int = 10) -> list[dict]:
    """One activation row per recorded step for one site, with the given per-record values."""
    n = len(next(iter(values.values())))
    return [{"step": every * (i + 1), "site": site, "kind": kind,
             **{key: series[i] for key, series in values.items()}} for i in range(n)]


def test_saturated_tanh_site_is_flagged_from_when_it_saturated():
    acts = rows("layers.2.act", "tanh", {"saturated_frac": [0.05, 0.1, 0.3, 0.6, 0.7, 0.7, 0.72, 0.7]})
    acts += rows("layers.0.act", "tanh", {"saturated_frac": [0.02] * 8})
    spec = {"model": {"arch": "mlp", "activation": "tanh", "init": "normal", "init_std": 0.5}}
    found = only(diagnose(STALLED, [], spec=spec, activations=acts), "saturated")
    assert found["layers"] == ["layers.2.act"] and found["severity"] == "critical"
    assert found["steps"] == {"first": 40, "last": 80}
    recs = {r["field"]: r["value"] for r in found["recommendations"]}
    assert recs["model.init_std"] == 0.25 and recs["model.norm"] == "batchnorm"
    assert recs["model.activation"] == "relu"


@pytest.mark.parametrize(("kind", "key", "value"), [("tanh", "saturated_frac", 0.7), ("relu", "dead_frac", 0.6)])
def test_past_the_critical_line_while_the_loss_still_falls_is_a_warning(kind, key, value):
    # a net still learning with saturated or dead units is at risk; one that stopped learning is failing
    finding_kind = "saturated" if key == "saturated_frac" else "dead_units"
    acts = rows("layers.1.act", kind, {key: [value] * 8})
    spec = {"model": {"arch": "mlp", "activation": kind}}
    assert only(diagnose(STEPS, [], spec=spec, activations=acts), finding_kind)["severity"] == "warning"
    assert only(diagnose(STALLED, [], spec=spec, activations=acts), finding_kind)["severity"] == "critical"


def test_a_few_percent_saturation_is_normal():
    acts = rows("layers.0.act", "sigmoid", {"saturated_frac": [0.04, 0.06, 0.05, 0.08]})
    assert "saturated" not in kinds(diagnose(STEPS, [], activations=acts))


def test_dead_relu_units_are_flagged_and_smooth_relatives_need_more():
    dead = rows("layers.1.act", "relu", {"dead_frac": [0.1, 0.3, 0.4, 0.4]})
    found = only(diagnose(STEPS, [], spec={"model": {"arch": "mlp", "activation": "relu"}}, activations=dead),
                 "dead_units")
    assert found["layers"] == ["layers.1.act"] and found["steps"]["first"] == 20 and found["severity"] == "warning"
    assert {r["field"]: r["value"] for r in found["recommendations"]}["model.activation"] == "leaky_relu"
    gelu = rows("layers.1.act", "gelu", {"dead_frac": [0.1, 0.3, 0.4, 0.4]})
    assert "dead_units" not in kinds(diagnose(STEPS, [], activations=gelu))
    healthy = rows("layers.1.act", "relu", {"dead_frac": [0.02, 0.05, 0.04, 0.03]})
    assert "dead_units" not in kinds(diagnose(STEPS, [], activations=healthy))


def _grad_time(rho: float, seq_len: int) -> list[list[float]]:
    ts = [0, seq_len // 4, seq_len // 2, 3 * seq_len // 4, seq_len - 1]
    return [[t, rho ** (seq_len - 1 - t)] for t in ts]


def _recurrent(rho: float, seq_len: int = 64) -> list[dict]:
    gt = _grad_time(rho, seq_len)
    return rows("layers.0.rnn", "recurrent", {"grad_time": [gt] * 6, "grad_time_ratio": [gt[0][1] / gt[-1][1]] * 6})


RNN_SPEC = {"model": {"arch": "rnn", "activation": "tanh"}, "training": {"seq_len": 64}}


def test_fast_decay_through_time_is_vanishing_through_time():
    found = only(diagnose(STEPS, [], spec=RNN_SPEC, activations=_recurrent(0.4)), "vanishing_through_time")
    assert found["layers"] == ["layers.0.rnn"] and found["severity"] == "critical"
    assert found["evidence"]["decay_per_step"]["layers.0.rnn"] == pytest.approx(0.4, rel=1e-6)
    assert 7 <= found["evidence"]["horizon_steps"] <= 8
    recs = {r["field"]: r["value"] for r in found["recommendations"]}
    assert recs == {"model.arch": "lstm", "model.recurrent_init": "orthogonal", "model.forget_bias": 1.0,
                    "training.seq_len": 15}


@pytest.mark.parametrize(("arch", "rho", "severity", "health"), [
    ("rnn", 0.6, "warning", "warning"), ("gru", 0.6, "info", "ok"), ("lstm", 0.6, "info", "ok"),
    ("rnn", 0.4, "critical", "critical"), ("gru", 0.4, "warning", "warning"), ("lstm", 0.4, "warning", "warning")])
def test_gated_cells_are_judged_one_severity_lower(arch, rho, severity, health):
    # a learned gate that forgets fast may be the data's short memory; an ungated RNN has no gate to open
    spec = {"model": {"arch": arch}, "training": {"seq_len": 64}}
    findings = diagnose(STEPS, [], spec=spec, activations=_recurrent(rho))
    found = only(findings, "vanishing_through_time")
    assert found["severity"] == severity and health_of(findings) == health
    assert ("the gates set this reach" in found["summary"]) == (arch != "rnn")


@pytest.mark.parametrize(("rho", "seq_len"), [(0.9, 64), (0.8, 64), (0.4, 8)])
def test_slow_decay_or_a_window_within_reach_is_not_flagged(rho, seq_len):
    spec = {**RNN_SPEC, "training": {"seq_len": seq_len}}
    assert "vanishing_through_time" not in kinds(diagnose(STEPS, [], spec=spec, activations=_recurrent(rho, seq_len)))


@pytest.mark.parametrize("gt", [[[0, 0.0], [16, 0.0], [32, 1e-20], [48, 1e-9], [63, 1.0]],
                                [[0, 0.0], [32, 0.0], [64, 0.0], [96, 0.0], [127, 11.0]]])
def test_gradient_that_underflows_to_zero_counts_as_vanished(gt):
    acts = rows("layers.0.rnn", "recurrent", {"grad_time": [gt] * 4})
    found = only(diagnose(STEPS, [], spec=RNN_SPEC, activations=acts), "vanishing_through_time")
    assert found["evidence"]["decay_per_step"]["layers.0.rnn"] < 0.3 and found["severity"] == "critical"


TRANSFORMER = {"model": {"arch": "transformer", "n_layers": 2, "d_model": 32, "n_heads": 4}}


GROWING_LOGITS = [3.0 * 1.3 ** i for i in range(10)]  # 3 -> 32 over steps 10..100


def test_attention_logits_that_grow_while_the_loss_stalls_are_flagged_with_z_lse_evidence():
    acts = rows("blocks.1.attn", "attention", {"attn_max_logit": GROWING_LOGITS,
                                               "attn_entropy": [2.0 - 0.15 * i for i in range(10)]})
    acts += rows("head", "output", {"z_lse": [4.0 + i for i in range(10)]})
    found = only(diagnose(STALLED, [], spec=TRANSFORMER, activations=acts), "attention_logit_growth")
    assert found["layers"] == ["blocks.1.attn"] and found["severity"] == "warning"
    assert found["evidence"]["growth"]["blocks.1.attn"] > 5 and found["evidence"]["z_lse_end"] == 13.0
    assert found["evidence"]["loss_trend_z"]["blocks.1.attn"] > -3
    assert found["steps"]["first"] == 60  # first record at or over 10
    assert {r["field"]: r["value"] for r in found["recommendations"]}["model.qk_norm"] is True


@pytest.mark.parametrize(("losses", "severity"), [(noisy([2.0] * 200, 0.02), "critical"), (decreasing(200), "warning")])
def test_attention_logits_over_the_bound_are_flagged_even_flat(losses, severity):
    # critical where the loss has stopped falling; while it still falls, a warning
    acts = rows("blocks.0.attn", "attention", {"attn_max_logit": [120.0] * 6})
    found = only(diagnose(steps(losses), [], spec=TRANSFORMER, activations=acts), "attention_logit_growth")
    assert found["severity"] == severity


def test_the_same_growth_while_the_loss_falls_is_learning_not_flagged():
    # heads that learn to attend sharpen: real healthy runs took max logits from ~2 to 11-25
    acts = rows("blocks.1.attn", "attention", {"attn_max_logit": GROWING_LOGITS})
    assert "attention_logit_growth" not in kinds(diagnose(STEPS, [], spec=TRANSFORMER, activations=acts))


def test_stable_or_small_attention_logits_are_not_flagged():
    stable = rows("blocks.0.attn", "attention", {"attn_max_logit": [8.0, 9.5, 8.2, 9.1, 8.7, 9.0, 8.4, 9.3]})
    small_growth = rows("blocks.1.attn", "attention", {"attn_max_logit": [1.0 + 0.3 * i for i in range(8)]})
    assert "attention_logit_growth" not in kinds(diagnose(STEPS, [], spec=TRANSFORMER, activations=stable + small_growth))


def test_nonfinite_activation_values_are_ignored():
    acts = rows("layers.0.act", "tanh", {"saturated_frac": [float("nan"), None, 0.01, 0.02]})
    assert diagnose(STEPS, [], activations=acts) == []
