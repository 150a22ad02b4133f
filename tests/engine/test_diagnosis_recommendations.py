"""Recommendations fit the spec for every finding kind: valid spec paths and values, never what is set."""

from __future__ import annotations

import pytest

from tests.engine.diagnosis_series import (
    assert_recommendations_fit,
    decreasing,
    issue8_run,
    noisy,
    only,
    steps,
)
from worker.engine.diagnosis import diagnose

N = 300
FALLING = noisy(decreasing(N), 0.03)


def _acts(site: str, kind: str, key: str, values: list) -> list[dict]:
    return [{"step": 10 * (i + 1), "site": site, "kind": kind, key: v} for i, v in enumerate(values)]


def _record(kind: str) -> dict:
    """A run whose diagnosis has a finding of `kind`."""
    mlp = {"model": {"arch": "mlp", "n_layers": 8, "activation": "sigmoid", "init": "normal", "init_std": 0.1}}
    rnn = {"model": {"arch": "rnn", "activation": "tanh"}, "training": {"seq_len": 64}}
    transformer = {"model": {"arch": "transformer", "n_layers": 2, "d_model": 32, "n_heads": 4}}
    if kind == "nonfinite":
        return {"steps": steps(FALLING, nonfinite_at=200), "layers": [],
                "spec": {**rnn, "stabilization": {"clip": {"mode": "none"}, "precision": "fp16"}}}
    if kind == "exploding":
        norms = [1.0] * N
        norms[150] = 400.0
        return {"steps": steps(FALLING, norms), "layers": [], "spec": {**rnn, "stabilization": {"clip": {"mode": "none"}}}}
    if kind == "vanishing":
        layers = [{"step": s, "layer": f"layers.{d}.linear.weight", "grad_norm": 10.0 ** (2 * d - 10),
                   "update_ratio": 1e-3} for s in (10, 20) for d in range(5)]
        return {"steps": steps(FALLING), "layers": layers, "spec": mlp}
    if kind == "update_ratio_high":
        layers = [{"step": s, "layer": "layers.0.w", "grad_norm": 1.0, "update_ratio": 0.5} for s in (10, 20)]
        return {"steps": steps(FALLING), "layers": layers, "spec": mlp}
    if kind == "loss_spike":
        losses = list(FALLING)
        losses[200] = 9.0
        return {"steps": steps(losses), "layers": [], "spec": {"stabilization": {"clip": {"mode": "none"}}}}
    if kind == "stalled":
        return {"steps": steps(noisy([3.0] * N, 0.02)), "layers": [], "spec": mlp}
    if kind in ("diverging", "rollbacks", "clipping_saturated"):
        return issue8_run()
    if kind == "overfitting":
        val = {s: 2.0 - s / 1000 if s <= 150 else 1.85 + (s - 150) / 500 for s in range(25, N + 1, 25)}
        return {"steps": steps(FALLING, val=val), "layers": [], "spec": {"training": {"max_steps": N}}}
    if kind == "saturated":
        return {"steps": steps(FALLING), "layers": [], "spec": mlp,
                "activations": _acts("layers.0.act", "sigmoid", "saturated_frac", [0.6] * 5)}
    if kind == "dead_units":
        return {"steps": steps(FALLING), "layers": [], "spec": {"model": {"arch": "mlp", "activation": "relu"}},
                "activations": _acts("layers.0.act", "relu", "dead_frac", [0.6] * 5)}
    if kind == "vanishing_through_time":
        gt = [[t, 0.4 ** (63 - t)] for t in (0, 16, 32, 48, 63)]
        return {"steps": steps(FALLING), "layers": [], "spec": rnn,
                "activations": _acts("layers.0.rnn", "recurrent", "grad_time", [gt] * 5)}
    if kind == "attention_logit_growth":
        # logits that grow while the loss has stopped falling (growth with a falling loss is learning)
        return {"steps": steps(noisy([3.0] * N, 0.02)), "layers": [], "spec": transformer,
                "activations": _acts("blocks.0.attn", "attention", "attn_max_logit", [4.0 * 1.4 ** i for i in range(8)])}
    raise AssertionError(kind)


KINDS = ("nonfinite", "exploding", "vanishing", "update_ratio_high", "loss_spike", "stalled", "diverging",
         "rollbacks", "clipping_saturated", "overfitting", "saturated", "dead_units", "vanishing_through_time",
         "attention_logit_growth")


@pytest.mark.parametrize("kind", KINDS)
def test_recommendations_are_valid_new_and_not_repeated_once_applied(kind):
    record = _record(kind)
    finding = only(diagnose(**record), kind)
    assert finding["recommendations"], f"{kind} has something to recommend for this spec"
    assert finding["steps"]["first"] <= finding["steps"]["last"]
    assert finding["evidence"]
    assert_recommendations_fit(record, finding)


def test_saturated_sigmoid_gets_smaller_init_normalization_and_relu_not_xavier():
    finding = only(diagnose(**_record("saturated")), "saturated")
    recs = {r["field"]: r["value"] for r in finding["recommendations"]}
    # switching to He init would leave the smaller init_std unread: the first (smaller init) wins
    assert recs == {"model.init_std": 0.05, "model.norm": "batchnorm", "model.activation": "relu"}


def test_rnn_vanishing_through_time_on_an_lstm_with_everything_set_only_shortens_the_window():
    record = _record("vanishing_through_time")
    record["spec"] = {"model": {"arch": "lstm", "recurrent_init": "orthogonal", "forget_bias": 1.0},
                      "training": {"seq_len": 64}}
    recs = only(diagnose(**record), "vanishing_through_time")["recommendations"]
    assert [(r["field"], r["value"]) for r in recs] == [("training.seq_len", 15)]


def test_switching_init_puts_the_option_it_leaves_unread_back_to_its_default():
    record = _record("vanishing")
    record["spec"] = {"model": {"arch": "mlp", "n_layers": 4, "activation": "tanh", "init": "normal", "init_std": 0.5}}
    recs = only(diagnose(**record), "vanishing")["recommendations"]
    fields = [r["field"] for r in recs]
    assert fields[:2] == ["model.init_std", "model.init"]
    assert (recs[0]["value"], recs[1]["value"]) == (0.02, "xavier_normal") and "default" in recs[0]["why"]
    assert_recommendations_fit(record, only(diagnose(**record), "vanishing"))


def test_a_fixed_threshold_replacing_an_adaptive_one_resets_the_adaptive_settings_inside_the_section():
    record = issue8_run()
    record["spec"]["stabilization"]["clip"] = {"mode": "adaptive", "percentile": 95.0}
    diverging = only(diagnose(**record), "diverging")
    [clip] = [r for r in diverging["recommendations"] if r["field"] == "stabilization.clip"]
    assert clip["value"]["mode"] == "norm" and clip["value"]["percentile"] == 90.0
    assert_recommendations_fit(record, diverging)


def test_the_filled_in_spec_is_parsed_once_and_each_caller_gets_its_own_copy():
    from worker.engine.diagnosis import spec as spec_module

    spec_module._full_spec_of_json.cache_clear()
    raw = {"model": {"arch": "lstm"}, "training": {"lr": 0.01}}
    first = spec_module.full_spec(raw)
    assert first["model"]["forget_bias"] is not None and first["training"]["lr"] == 0.01
    first["training"]["lr"] = 99.0  # a caller changing its copy changes nobody else's
    second = spec_module.full_spec(raw)
    assert second["training"]["lr"] == 0.01 and raw == {"model": {"arch": "lstm"}, "training": {"lr": 0.01}}
    info = spec_module._full_spec_of_json.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    # a spec that does not parse comes back as given, as before
    assert spec_module.full_spec({"model": {"arch": "nope"}}) == {"model": {"arch": "nope"}}
