"""Diagnosis on synthetic series: each finding fires on its pattern and only there."""

from __future__ import annotations

from worker.engine.diagnosis import diagnose, summarize


def _steps(losses, norms, **flags):
    return [
        {"step": i + 1, "loss": loss, "grad_norm": norm, "clipped": flags.get("clipped", False),
         "nonfinite": flags.get("nonfinite_at") == i + 1, "skipped": False}
        for i, (loss, norm) in enumerate(zip(losses, norms, strict=True))
    ]


def _decreasing(n=100):
    return [3.0 - 2.0 * i / n for i in range(n)]


def _kinds(findings):
    return [f["kind"] for f in findings]


def test_healthy_run_has_no_findings():
    findings = diagnose(_steps(_decreasing(), [1.0] * 100), [])
    assert findings == []
    assert summarize(findings).startswith("healthy")


def test_grad_norm_jump_is_exploding_with_steps_and_evidence():
    norms = [1.0] * 100
    norms[60] = 500.0
    spec = {"training": {"lr": 0.1}, "stabilization": {"clip": {"mode": "none"}}, "model": {"arch": "rnn"}}
    [finding] = [f for f in diagnose(_steps(_decreasing(), norms), [], spec=spec) if f["kind"] == "exploding"]
    assert finding["severity"] == "critical"
    assert finding["steps"] == {"first": 61, "last": 61}
    assert finding["evidence"]["peak_grad_norm"] == 500.0
    recs = {r["field"]: r["value"] for r in finding["recommendations"]}
    assert recs["stabilization.clip"] == {"mode": "norm", "max_norm": 1.0}
    assert recs["training.lr"] == 0.03
    assert all(r["why"] for r in finding["recommendations"])


def test_large_early_norms_that_settle_are_not_exploding():
    norms = [100.0] * 5 + [1.0] * 95
    assert "exploding" not in _kinds(diagnose(_steps(_decreasing(), norms), []))


def test_nonfinite_steps_are_reported_first():
    losses = _decreasing()
    losses[80] = float("nan")
    findings = diagnose(_steps(losses, [1.0] * 100, nonfinite_at=81), [])
    assert findings[0]["kind"] in ("nonfinite", "exploding")
    nonfinite = next(f for f in findings if f["kind"] == "nonfinite")
    assert nonfinite["evidence"]["first_step"] == 81


def test_layers_orders_of_magnitude_weaker_are_vanishing():
    layers = []
    for step in (10, 20, 30):
        for depth, name in enumerate(["embed.weight", "layers.0.w", "layers.1.w", "layers.2.w", "head.weight"]):
            layers.append({"step": step, "layer": name, "grad_norm": 10.0 ** (2 * depth - 10), "update_ratio": 1e-3})
    spec = {"model": {"activation": "sigmoid", "init": "normal", "residual": False, "norm": "none", "arch": "mlp",
                      "n_layers": 8}}
    [finding] = [f for f in diagnose(_steps(_decreasing(), [1.0] * 100), layers, spec=spec)
                 if f["kind"] == "vanishing"]
    assert finding["layers"] == ["layers.0.w", "layers.1.w"]  # embeddings are not judged by depth
    recs = {r["field"]: r["value"] for r in finding["recommendations"]}
    assert recs == {"model.activation": "relu", "model.init": "kaiming_normal", "model.residual": True,
                    "model.norm": "batchnorm", "model.n_layers": 4}


def test_loss_spike_and_stall_and_clipping():
    losses = [2.0] * 100
    losses[50] = 6.0
    findings = diagnose(_steps(losses, [1.0] * 100, clipped=True), [],
                        spec={"stabilization": {"clip": {"mode": "norm"}, "on_explosion": "none"}})
    kinds = _kinds(findings)
    assert {"loss_spike", "stalled", "clipping_saturated"} <= set(kinds)
    spike = next(f for f in findings if f["kind"] == "loss_spike")
    assert spike["steps"]["first"] == 51
    assert any(r["field"] == "stabilization.on_explosion" for r in spike["recommendations"])


def test_high_update_ratio_points_at_the_learning_rate():
    layers = [{"step": s, "layer": "layers.0.w", "grad_norm": 1.0, "update_ratio": 0.5} for s in (10, 20)]
    [finding] = [f for f in diagnose(_steps(_decreasing(), [1.0] * 100), layers, spec={"training": {"lr": 1.0}})
                 if f["kind"] == "update_ratio_high"]
    assert finding["recommendations"][0] == {"field": "training.lr", "value": 0.3,
                                             "why": finding["recommendations"][0]["why"]}
