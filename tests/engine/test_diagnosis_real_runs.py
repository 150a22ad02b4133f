"""Diagnosis of real CPU runs of the engine: a transformer whose loss falls then rises is diverging,
its twin at a tenth of the rate is not, and the default transformer learning at a common rate is healthy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.engine.spec_helpers import Recorder, corpus, spec
from worker.engine.diagnosis import health_of
from worker.engine.trainer import Trainer

# Adam at 3e-2 after a short warm-up, adaptive clipping: the loss falls for ~100 steps, then creeps up
# while the grad norm grows step by step (no single jump), as in issue 8. Without norms and with tanh
# (the transformer's defaults before layernorm + gelu): the run that shows the problem.
TOO_HIGH = {
    "model": {"arch": "transformer", "n_layers": 2, "d_model": 32, "n_heads": 4, "norm": "none",
              "activation": "tanh"},
    "training": {"max_steps": 300, "batch_size": 16, "seq_len": 16, "lr": 3e-2, "optimizer": "adam",
                 "warmup_steps": 20, "eval_every": 1000},
    "stabilization": {"clip": {"mode": "adaptive"}},
    "monitoring": {"layer_stats_every": 50},
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # A tiny model gains nothing from threads; on a shared machine they only contend.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(lr: float, tmp_path: Path) -> tuple[list[dict], list[dict]]:
    rec = Recorder()
    s = spec(**{**TOO_HIGH, "training": {**TOO_HIGH["training"], "lr": lr}})
    result = Trainer(s, corpus(20_000), tmp_path / "ckpt", rec).run()
    assert result.status == "succeeded", result.error
    return rec.rows, result.diagnosis


def test_too_high_a_rate_is_diverging_from_its_loss_minimum(tmp_path):
    rows, findings = _train(3e-2, tmp_path)
    diverging = next(f for f in findings if f["kind"] == "diverging")
    first, last = diverging["steps"]["first"], diverging["steps"]["last"]
    loss_at = {r["step"]: r["loss"] for r in rows}
    early = min(loss_at[s] for s in range(1, 11))
    assert 20 <= first < last and loss_at[last] > loss_at[first]  # started after the fall, before the peak
    assert diverging["evidence"]["loss_min"] < early  # the loss fell before it rose
    assert diverging["evidence"]["grad_norm_growth"] > 2 and diverging["severity"] == "critical"
    assert health_of(findings) == "critical"
    # without norms the attention logits run away (to ~1e5 here) while the loss rises: critical
    attention = next(f for f in findings if f["kind"] == "attention_logit_growth")
    assert max(attention["evidence"]["attn_max_logit"].values()) > 100 and attention["severity"] == "critical"
    fields = {r["field"] for r in diverging["recommendations"]}
    assert {"training.lr", "stabilization.clip", "model.qk_norm"} <= fields


def test_the_same_run_at_a_tenth_of_the_rate_is_not_diverging(tmp_path):
    rows, findings = _train(3e-3, tmp_path)
    assert "diverging" not in {f["kind"] for f in findings}
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5


def test_the_default_transformer_learning_at_a_common_rate_is_healthy(tmp_path):
    # GPT-2 defaults (layernorm + gelu), lr 3e-3 cosine: the loss falls all along while the heads learn
    # to attend, so their max logits grow several-fold; growth with a falling loss is learning.
    rec = Recorder()
    s = spec(model={"arch": "transformer", "n_layers": 2, "d_model": 64, "n_heads": 4, "hidden": None},
             training={"max_steps": 400, "batch_size": 16, "seq_len": 64, "lr": 3e-3, "schedule": "cosine",
                       "warmup_steps": 50, "eval_every": 100},
             stabilization={"clip": {"mode": "norm", "max_norm": 1.0}},
             monitoring={"layer_stats_every": 10})
    result = Trainer(s, corpus(None), tmp_path / "ckpt", rec).run()
    assert result.status == "succeeded", result.error
    logits = [a["attn_max_logit"] for a in rec.acts if a["kind"] == "attention"]
    assert max(logits) > 3 * min(logits) and max(logits) > 10  # the heads did sharpen
    assert rec.rows[-1]["loss"] < rec.rows[0]["loss"] - 2.0
    assert result.diagnosis == [] and health_of(result.diagnosis) == "ok", result.diagnosis
