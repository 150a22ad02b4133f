"""Diagnosis on synthetic series: each finding fires on its pattern and only there."""

from __future__ import annotations

from worker.engine.diagnosis import diagnose, health_of, summarize


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


def test_exploding_follows_the_specs_explosion_factor():
    norms = [1.0] * 100
    norms[60] = 8.0
    assert "exploding" not in _kinds(diagnose(_steps(_decreasing(), norms), [], spec={}))  # default 10x
    found = diagnose(_steps(_decreasing(), norms), [], spec={"stabilization": {"explosion_factor": 5.0}})
    exploding = next(f for f in found if f["kind"] == "exploding")
    assert exploding["severity"] == "warning" and exploding["evidence"]["explosion_factor"] == 5.0


def test_grad_norm_spike_events_are_exploding_evidence_not_loss_spikes():
    event = {"step": 40, "kind": "grad_norm_spike", "message": "",
             "data": {"policy": "skip", "rule": "grad_norm", "value": 30.0, "median": 1.0, "factor": 10.0}}
    findings = diagnose(_steps(_decreasing(), [1.0] * 100), [], events=[event])
    assert _kinds(findings) == ["exploding"]
    assert findings[0]["steps"] == {"first": 40, "last": 40} and findings[0]["evidence"]["guard_events"] == 1


def test_no_nonfinite_finding_without_nonfinite_steps():
    assert "nonfinite" not in _kinds(diagnose(_steps(_decreasing(), [1.0] * 100), []))


def test_layers_within_two_orders_of_magnitude_are_not_vanishing():
    layers = [{"step": s, "layer": f"layers.{d}.w", "grad_norm": 10.0 ** (-d / 2), "update_ratio": 1e-3}
              for s in (10, 20) for d in range(4)]
    assert "vanishing" not in _kinds(diagnose(_steps(_decreasing(), [1.0] * 100), layers))


def test_normal_update_ratios_are_not_high():
    layers = [{"step": s, "layer": "layers.0.w", "grad_norm": 1.0, "update_ratio": 2e-3} for s in (10, 20)]
    assert "update_ratio_high" not in _kinds(diagnose(_steps(_decreasing(), [1.0] * 100), layers))


def test_rollbacks_make_a_finished_run_unhealthy_and_none_leave_it_healthy():
    events = [{"step": 30, "kind": "rollback", "message": "", "data": {"to_step": 20, "rollbacks": 1}},
              {"step": 30, "kind": "lr_lowered", "message": "", "data": {"lr_scale": 0.5}}]
    spec = {"training": {"lr": 1e-2}, "stabilization": {"on_explosion": "rollback"}}
    findings = diagnose(_steps(_decreasing(), [1.0] * 100), [], events=events, spec=spec)
    [rollbacks] = findings
    assert rollbacks["kind"] == "rollbacks" and rollbacks["severity"] == "warning"
    assert rollbacks["evidence"]["lr_scale"] == 0.5 and rollbacks["steps"] == {"first": 30, "last": 30}
    assert {r["field"]: r["value"] for r in rollbacks["recommendations"]}["training.lr"] == 5e-3
    assert health_of(findings) == "warning" and not summarize(findings).startswith("healthy")
    assert diagnose(_steps(_decreasing(), [1.0] * 100), [], events=[], spec=spec) == []


def test_health_is_the_worst_severity():
    assert health_of([]) == "ok" and health_of(None) == "ok"
    assert health_of([{"severity": "info"}]) == "ok"
    assert health_of([{"severity": "info"}, {"severity": "warning"}]) == "warning"
    assert health_of([{"severity": "warning"}, {"severity": "critical"}]) == "critical"


def _depth_layers(spread: float = 2.0) -> list[dict]:
    return [{"step": s, "layer": f"layers.{d}.linear.weight", "grad_norm": 10.0 ** (spread * d - 10),
             "update_ratio": 1e-3} for s in (10, 20, 30) for d in range(5)]


def _vanishing_recs(model: dict) -> dict:
    spec = {"model": {"arch": "mlp", "n_layers": 4, **model}}
    [finding] = [f for f in diagnose(_steps(_decreasing(), [1.0] * 100), _depth_layers(), spec=spec)
                 if f["kind"] == "vanishing"]
    assert finding["steps"]["first"] == 10
    return {r["field"]: r["value"] for r in finding["recommendations"]}


def test_vanishing_in_a_relu_kaiming_net_does_not_recommend_relu_or_kaiming():
    recs = _vanishing_recs({"activation": "relu", "init": "kaiming_normal"})
    assert "model.activation" not in recs and "model.init" not in recs
    assert recs == {"model.norm": "batchnorm", "model.residual": True}


def test_vanishing_with_tanh_recommends_xavier_and_normalization_first():
    recs = _vanishing_recs({"activation": "tanh", "init": "normal"})
    assert list(recs)[:2] == ["model.init", "model.norm"]
    assert recs["model.init"] == "xavier_normal" and recs["model.norm"] == "batchnorm"


def test_vanishing_with_sigmoid_never_recommends_xavier():
    recs = _vanishing_recs({"activation": "sigmoid", "init": "default"})
    assert recs["model.activation"] == "relu" and recs["model.init"] == "kaiming_normal"
    assert not str(recs.get("model.init")).startswith("xavier")
    recs = _vanishing_recs({"activation": "sigmoid", "init": "kaiming_normal", "norm": "batchnorm", "residual": True})
    assert recs == {"model.activation": "relu"}


def test_transformer_vanishing_recommendation_skips_batchnorm_it_cannot_use():
    spec = {"model": {"arch": "transformer", "n_layers": 2, "d_model": 32, "n_heads": 4, "activation": "gelu",
                      "init": "kaiming_normal", "norm": "none"}}
    [finding] = [f for f in diagnose(_steps(_decreasing(), [1.0] * 100), _depth_layers(), spec=spec)
                 if f["kind"] == "vanishing"]
    assert {r["field"]: r["value"] for r in finding["recommendations"]} == {"model.norm": "layernorm"}


def test_diagnosis_imports_no_torch_so_the_api_and_cli_may_use_it():
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, worker.engine.diagnosis; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"
