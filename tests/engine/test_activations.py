"""Activation statistics, gradients through time and spike attribution measure what they claim."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from worker.engine import budget as budget_module
from worker.engine import trainer as trainer_module
from worker.engine.activations import ActivationMonitor, probe_positions
from worker.engine.budget import CostBudget
from worker.engine.config import parse_spec
from worker.engine.models import build_model
from worker.engine.trainer import Trainer

from .spec_helpers import Recorder, corpus, merge, spec

VOCAB, SEQ = 50, 16


def _model(**model):
    cfg = parse_spec({"model": model}).model
    torch.manual_seed(0)
    return build_model(cfg, VOCAB, SEQ)


def _stats(model, x) -> dict[str, dict]:
    monitor = ActivationMonitor(model)
    with monitor.capture():
        model(x)
    return {r["site"]: r for r in monitor.rows(monitor.collected(), None, SEQ)}


def _tokens(batch: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_dead_fraction_counts_units_negative_for_the_whole_batch():
    model = _model(arch="mlp", n_layers=2, d_model=8, hidden=16, context=4, activation="relu")
    model.layers[1].linear.bias[:4] = -1e4  # four units can never fire
    model.layers[1].linear.bias[4:] = 1e4  # the rest always do
    rows = _stats(model, _tokens())
    assert rows["layers.1.act"]["dead_frac"] == pytest.approx(4 / 16)
    assert rows["layers.1.act"]["saturated_frac"] is None or math.isnan(rows["layers.1.act"]["saturated_frac"])


@torch.no_grad()
def test_saturated_fraction_follows_the_scale_of_the_pre_activations():
    model = _model(arch="mlp", n_layers=2, d_model=8, hidden=16, context=4, activation="tanh")
    calm = _stats(model, _tokens())["layers.0.act"]["saturated_frac"]
    model.layers[0].linear.weight.mul_(100.0)
    saturated = _stats(model, _tokens())["layers.0.act"]["saturated_frac"]
    assert calm < 0.2 and saturated > 0.9


@torch.no_grad()
def test_attention_and_output_statistics_match_a_direct_computation():
    model = _model(arch="transformer", n_layers=1, d_model=16, n_heads=2, norm="layernorm")
    model.eval()
    x = _tokens(2)
    rows = _stats(model, x)
    block = model.blocks[0]
    h = block.norm1(model.tok_emb(x) + model.pos_emb(torch.arange(SEQ)))
    q, k, _ = block.attn.qkv(h).view(2, SEQ, 3, 2, 8).unbind(2)
    logits = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / math.sqrt(8)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    attn = rows["blocks.0.attn"]
    assert attn["attn_max_logit"] == pytest.approx(logits.masked_fill(~causal, -math.inf).amax().item(), rel=1e-5)
    # Each row t attends over t+1 positions: entropy is at most ln(t+1), and at least 0.
    assert 0 < attn["attn_entropy"] < sum(math.log(t + 1) for t in range(SEQ)) / SEQ
    assert rows["head"]["z_lse"] == pytest.approx(torch.logsumexp(model(x), -1).mean().item(), rel=1e-5)


@torch.no_grad()
def test_uniform_attention_has_the_maximal_entropy():
    model = _model(arch="transformer", n_layers=1, d_model=16, n_heads=2)
    model.blocks[0].attn.qkv.weight[:16].zero_()  # q = bias = 0: every logit is 0
    model.blocks[0].attn.qkv.bias.zero_()
    attn = _stats(model.eval(), _tokens(2))["blocks.0.attn"]
    assert attn["attn_max_logit"] == pytest.approx(0.0, abs=1e-6)
    assert attn["attn_entropy"] == pytest.approx(sum(math.log(t + 1) for t in range(SEQ)) / SEQ, rel=1e-5)


def test_hooks_are_removed_after_capture():
    model = _model(arch="transformer", n_layers=1, d_model=16, n_heads=2)
    _stats(model, _tokens(2))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _through_time(model) -> list[float]:
    x = _tokens(4)
    y = torch.roll(x, -1, dims=1)
    monitor = ActivationMonitor(model)
    row = next(r for r in monitor.rows(None, monitor.grad_through_time(x, y), SEQ) if r["kind"] == "recurrent")
    assert [t for t, _ in row["grad_time"]] == probe_positions(SEQ) == [0, 4, 8, 12, 15]
    return [n for _, n in row["grad_time"]]


def test_gradient_through_time_is_zero_without_a_recurrence_and_flows_with_one():
    model = _model(arch="rnn", n_layers=1, d_model=8, hidden=16, activation="tanh", recurrent_init="orthogonal")
    flowing = _through_time(model)
    with torch.no_grad():
        model.layers[0].rnn.weight_hh_l0.zero_()
    cut = _through_time(model)
    assert all(n > 0 for n in flowing)
    assert cut[-1] > 0 and cut[:-1] == [0.0, 0.0, 0.0, 0.0]


def test_through_time_probe_leaves_grads_rng_and_mode_alone():
    model = _model(arch="lstm", n_layers=2, d_model=8, hidden=16, dropout=0.1)
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    rng = torch.get_rng_state()
    _through_time(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_trainer_reports_activation_rows_in_depth_order_at_layer_stat_steps(tmp_path: Path):
    rec = Recorder()
    s = spec(model={"arch": "rnn", "n_layers": 2, "activation": "tanh"}, training={"max_steps": 10})
    Trainer(s, corpus(), tmp_path, rec).run()
    assert sorted({r["step"] for r in rec.acts}) == [5, 10]
    at5 = [r for r in rec.acts if r["step"] == 5]
    assert [r["site"] for r in at5] == ["layers.0.rnn", "layers.1.rnn", "head"]
    assert all(0 <= r["saturated_frac"] <= 1 and r["grad_time_ratio"] >= 0 for r in at5[:2])
    assert at5[2]["kind"] == "output" and at5[2]["z_lse"] > 0


def test_the_probe_keeps_to_its_budget_but_always_sees_the_first_and_last_stats_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "THROUGH_TIME_COST_RATIO", 1e12)  # never due again after one run
    rec = Recorder()
    s = spec(model={"arch": "rnn", "n_layers": 1, "activation": "tanh"},
             training={"max_steps": 23}, monitoring={"layer_stats_every": 5})
    Trainer(s, corpus(), tmp_path, rec).run()
    rnn = {r["step"]: r for r in rec.acts if r["site"] == "layers.0.rnn"}
    assert sorted(rnn) == [5, 10, 15, 20]  # the other statistics come at every stats step
    assert [step for step, r in sorted(rnn.items()) if r["grad_time"]] == [5, 20]
    assert rnn[10]["grad_time_ratio"] is None and rnn[10]["saturated_frac"] is not None


def test_a_cost_budget_waits_ratio_times_the_last_cost(monkeypatch):
    clock = iter([0.0, 0.0, 2.0, 2.0, 2.0 + 199 * 2.0, 2.0 + 200 * 2.0])
    monkeypatch.setattr(budget_module.time, "perf_counter", lambda: next(clock))
    budget = CostBudget(200)
    assert budget.due()  # 0.0: never ran
    budget.start()  # 0.0
    budget.stop()  # 2.0: it cost 2 s
    assert not budget.due()  # 2.0: 0 s since
    assert not budget.due()  # 199 x 2 s since
    assert budget.due()  # 200 x 2 s since


def test_activation_stats_can_be_turned_off(tmp_path: Path):
    rec = Recorder()
    Trainer(spec(monitoring={"activation_stats": False}), corpus(), tmp_path, rec).run()
    assert rec.acts == [] and rec.layers


SPIKING_RNN = {
    "model": {"arch": "rnn", "activation": "relu", "d_model": 32, "hidden": 64, "init": "normal", "init_std": 0.1},
    "training": {"max_steps": 40, "batch_size": 8, "seq_len": 32, "lr": 1.0, "optimizer": "sgd"},
    "stabilization": {"clip": {"mode": "none"}, "on_explosion": "skip", "max_consecutive_skips": 100},
}


def test_grad_norm_spikes_name_the_rule_and_the_rows_that_caused_them(tmp_path: Path):
    text = corpus()
    s = spec(**merge(SPIKING_RNN, {"monitoring": {"attribution_top_k": 3}}))
    tr = Trainer(s, text, tmp_path, rec := Recorder())
    tr.run()
    spikes = [e for e in rec.events if e["kind"] == "grad_norm_spike"]
    assert spikes and not [e for e in rec.events if e["kind"] == "loss_spike"]
    data = spikes[0]["data"]
    assert data["rule"] == "grad_norm" and data["factor"] == 10.0 and data["value"] > 10 * data["median"]
    attribution = data["attribution"]
    assert len(attribution["offsets"]) == 8 and len(attribution["top"]) == 3
    losses = [row["loss"] for row in attribution["top"]]
    assert losses == sorted(losses, reverse=True)
    encoded = text.encode("utf-8")
    for row in attribution["top"]:
        assert row["offset"] in attribution["offsets"]
        window = encoded[row["offset"]:row["offset"] + 120].decode("utf-8", errors="replace").lstrip("\ufffd")
        assert row["excerpt"] == window[:80]


def test_top_rows_are_the_rows_with_the_highest_own_loss(tmp_path: Path):
    s = spec(**merge(SPIKING_RNN, {"monitoring": {"attribution_top_k": 2}}))
    tr = Trainer(s, corpus(), tmp_path)
    x, y, offsets = tr.data.batch_with_offsets("train", 8, torch.Generator().manual_seed(3))
    with torch.no_grad():
        own = F.cross_entropy(tr.model(x).flatten(0, 1), y.flatten(), reduction="none").view(8, -1).mean(1)
    pending = type("P", (), {"offsets": offsets, "row_losses": own})()
    top = tr._attribution(pending)["top"]
    expected = [int(offsets[i]) for i in own.argsort(descending=True)[:2]]
    assert [row["offset"] for row in top] == expected
