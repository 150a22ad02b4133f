"""Trend findings on synthetic curves: each fires on its pattern, its negative twin stays quiet."""

from __future__ import annotations

import math

import pytest

from tests.engine.diagnosis_series import decreasing, issue8_run, kinds, noisy, only, steps
from worker.engine.diagnosis import diagnose, health_of, summarize


def test_issue8_run_is_diverging_from_its_loss_minimum_and_never_healthy():
    run = issue8_run()
    findings = diagnose(**run)
    assert health_of(findings) == "critical" and not summarize(findings).startswith("healthy")
    diverging = only(findings, "diverging")
    assert diverging["severity"] == "critical"
    assert 150 <= diverging["steps"]["first"] <= 260  # the loss minimum, not the first jump
    assert 650 <= diverging["steps"]["last"] <= 900
    ev = diverging["evidence"]
    assert 1.15 < ev["loss_min"] < 1.35 and 2.4 < ev["loss_peak"] < 2.8
    assert ev["grad_norm_growth"] > 5 and ev["clipped_fraction"] > 0.9
    assert (ev["val_loss_start"], ev["val_loss_end"]) == (3.1, 3.5)
    assert "adaptive" in diverging["summary"]
    recs = {r["field"]: r["value"] for r in diverging["recommendations"]}
    assert recs["training.lr"] == pytest.approx(3e-3 / 8, rel=0.02)  # what the rollbacks found stable
    assert recs["stabilization.clip"]["mode"] == "norm" and 1.0 < recs["stabilization.clip"]["max_norm"] < 2.0
    assert recs["model.qk_norm"] is True and recs["training.warmup_steps"] > 0


def test_issue8_run_names_the_engine_actions():
    findings = diagnose(**issue8_run())
    rollbacks = only(findings, "rollbacks")
    assert rollbacks["evidence"]["rollbacks"] == 3 and rollbacks["evidence"]["lr_scale"] == 0.125
    assert rollbacks["steps"] == {"first": 450, "last": 690} and rollbacks["severity"] == "critical"
    exploding = only(findings, "exploding")  # grad_norm_spike events, not loss spikes
    assert exploding["evidence"]["guard_events"] == 3 and exploding["evidence"]["attribution"][0]["offset"] == 64
    assert "loss_spike" not in kinds(findings)
    clipping = only(findings, "clipping_saturated")
    assert "adaptive threshold followed the grad norm up" in clipping["summary"] and clipping["severity"] == "warning"


@pytest.mark.parametrize("seed", range(5))
def test_noisy_decreasing_loss_is_not_diverging(seed):
    n = 1500
    losses = noisy(decreasing(n), 0.12, seed=seed)
    norms = noisy([2.0 - 0.5 * i / n for i in range(n)], 0.4, seed=seed + 100)
    assert "diverging" not in kinds(diagnose(steps(losses, norms), []))  # heavy tails may make spikes


@pytest.mark.parametrize("seed", range(5))
def test_noisy_plateau_is_not_diverging(seed):
    losses = noisy([3.0] * 1000, 0.15, seed=seed)
    norms = noisy([1.0] * 1000, 0.5, seed=seed + 7)
    found = kinds(diagnose(steps(losses, norms), []))
    assert "diverging" not in found and "stalled" in found


def test_cosine_schedule_run_that_converges_is_healthy():
    n = 2000
    # with a cosine rate the loss keeps falling and flattens as the rate decays; grad norm drifts up late
    progress = [0.5 * (1 - math.cos(math.pi * i / n)) for i in range(n)]
    losses = noisy([1.2 + 4.3 * math.exp(-6 * p) for p in progress], 0.05, seed=3)
    norms = noisy([0.8 + 0.6 * p for p in progress], 0.3, seed=4)
    findings = diagnose(steps(losses, norms), [], spec={"training": {"schedule": "cosine", "max_steps": n}})
    assert findings == [] and health_of(findings) == "ok"


def test_diverging_names_the_layers_whose_gradients_grew():
    run = issue8_run()
    run["layers"] = [{"step": s, "layer": name, "grad_norm": g * (1 if s <= 200 else 1 + (s - 200) / 50 * k),
                      "update_ratio": 1e-3}
                     for s in range(50, 1501, 50) for name, g, k in (("blocks.0.attn.qkv.weight", 0.5, 1.0),
                                                                     ("blocks.3.mlp.fc.weight", 0.5, 0.0))]
    diverging = only(diagnose(**run), "diverging")
    assert diverging["layers"] == ["blocks.0.attn.qkv.weight"]
    assert diverging["evidence"]["layer_grad_growth"]["blocks.0.attn.qkv.weight"] > 5


def test_loss_rise_without_grad_growth_is_a_warning_not_critical():
    n = 600
    losses = noisy([2.0 - i / 300 if i < 300 else 1.0 + (i - 300) / 300 for i in range(n)], 0.05)
    diverging = only(diagnose(steps(losses, [1.0] * n), []), "diverging")
    assert diverging["severity"] == "warning" and "did not grow" in diverging["summary"]
    assert 270 <= diverging["steps"]["first"] <= 330


def test_short_bump_is_a_spike_not_a_trend():
    losses = noisy(decreasing(800), 0.05)
    for i in range(400, 420):
        losses[i] *= 1.6
    assert "diverging" not in kinds(diagnose(steps(losses), []))


def test_overfitting_when_val_rises_while_train_falls():
    n = 1000
    val = {s: 2.0 - s / 1000 if s <= 400 else 1.6 + (s - 400) / 1000 for s in range(50, n + 1, 50)}
    record = {"steps": steps(noisy(decreasing(n), 0.05), val=val), "layers": []}
    found = only(diagnose(**record, spec={"training": {"max_steps": n}}), "overfitting")
    assert found["steps"]["first"] == 400 and found["evidence"]["best_val_loss"] == pytest.approx(1.6)
    recs = {r["field"]: r["value"] for r in found["recommendations"]}
    assert recs == {"model.dropout": 0.1, "training.weight_decay": 0.1, "training.max_steps": 400}
    assert "more data" in found["summary"]


def test_no_overfitting_while_val_keeps_falling_or_train_rises_too():
    n = 1000
    falling = {s: 2.0 - s / 2000 for s in range(50, n + 1, 50)}
    assert "overfitting" not in kinds(diagnose(steps(noisy(decreasing(n), 0.05), val=falling), []))
    rising = {s: 2.0 + s / 1000 for s in range(50, n + 1, 50)}
    both_rise = [1.5 + i / 1000 for i in range(n)]
    assert "overfitting" not in kinds(diagnose(steps(both_rise, val=rising), []))


def test_clipping_most_steps_in_norm_mode_is_saturated_and_half_is_not():
    n = 400
    spec = {"stabilization": {"clip": {"mode": "norm", "max_norm": 1.0}}}
    losses = noisy(decreasing(n), 0.05)
    found = only(diagnose(steps(losses, [3.0] * n, clipped=True), [], spec=spec), "clipping_saturated")
    assert found["evidence"]["clipped_fraction"] == 1.0 and "below the typical grad norm" in found["summary"]
    assert found["severity"] == "info"  # a steady norm rescaled every step: nothing unstable
    assert {r["field"]: r["value"] for r in found["recommendations"]} == {"stabilization.clip.max_norm": 3.0}
    half = diagnose(steps(losses, [3.0] * n, clipped=lambda s: s % 2 == 0), [], spec=spec)
    assert "clipping_saturated" not in kinds(half)


def test_clipping_saturated_in_a_late_window_says_when_it_started():
    n = 1000
    clipped = diagnose(steps(noisy(decreasing(n), 0.05), clipped=lambda s: s > 700), [],
                       spec={"stabilization": {"clip": {"mode": "agc"}}})
    found = only(clipped, "clipping_saturated")
    assert 600 < found["steps"]["first"] <= 710 and found["steps"]["last"] == n


def test_loss_spike_from_the_curve_and_from_the_guard():
    losses = noisy(decreasing(200), 0.02)
    losses[120] = 9.0
    found = only(diagnose(steps(losses), []), "loss_spike")
    assert found["steps"]["first"] == 121
    quiet = noisy(decreasing(200), 0.02)
    assert "loss_spike" not in kinds(diagnose(steps(quiet), []))
    event = {"step": 90, "kind": "loss_spike", "message": "", "data": {"rule": "loss", "value": 4.0, "median": 2.0,
             "attribution": {"offsets": [5], "top": [{"offset": 5, "loss": 7.0, "excerpt": "garbage"}]}}}
    guarded = only(diagnose(steps(quiet), [], events=[event]), "loss_spike")
    assert guarded["evidence"]["guard_events"] == 1 and guarded["evidence"]["attribution"][0]["excerpt"] == "garbage"
    assert "exploding" not in kinds(diagnose(steps(quiet), [], events=[event]))


def test_stalled_is_not_reported_for_a_diverging_run():
    n = 600
    losses = noisy([2.0 + i / 300 for i in range(n)], 0.03)
    norms = [1.0 * 10 ** (i / 300) for i in range(n)]
    found = kinds(diagnose(steps(losses, norms), []))
    assert "diverging" in found and "stalled" not in found
