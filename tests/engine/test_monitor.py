"""Run history stays bounded and round-trips through checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

from worker.engine import monitor
from worker.engine.monitor import RunHistory


def _layer_rows(step: int) -> list[dict]:
    return [{"layer": name, "grad_norm": step * 1.0, "weight_norm": 2.0, "update_ratio": 1e-3}
            for name in ("a.weight", "b.weight")]


def _filled(n_steps: int) -> RunHistory:
    history = RunHistory()
    for step in range(1, n_steps + 1):
        history.add_step({"step": step, "loss": 1.0 / step, "grad_norm": 0.5, "clipped": step % 2 == 0,
                          "nonfinite": False, "skipped": False, "lr": 1e-3 / step,
                          "val_loss": 2.0 / step if step % 5 == 0 else None})
        history.add_layers(step, _layer_rows(step))
        history.events.append({"step": step, "kind": "checkpoint", "message": "", "data": {}})
    return history


def test_layer_records_are_thinned_by_half_past_the_cap(monkeypatch):
    monkeypatch.setattr(monitor, "MAX_LAYER_RECORDS", 8)
    history = _filled(9)
    assert history.layer_steps == [1, 3, 5, 7, 9]
    assert [r["layer"] for r in history.layers[:2]] == ["a.weight", "b.weight"]
    assert history.layers[2] == {"step": 3, "layer": "a.weight", "grad_norm": 3.0, "weight_norm": 2.0,
                                 "update_ratio": 1e-3}


def test_history_round_trips_through_a_weights_only_checkpoint_and_truncates():
    history = _filled(20)
    buffer = io.BytesIO()
    torch.save(history.state_dict(), buffer)
    buffer.seek(0)
    restored = RunHistory()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.step_rows() == history.step_rows()
    assert restored.layers == history.layers
    restored.truncate_after(12)
    assert [r["step"] for r in restored.step_rows()] == list(range(1, 13))
    assert restored.layer_steps[-1] == 12 and len(restored.events) == 12


def _activation_rows(step: int) -> list[dict]:
    return [
        {"site": "layers.0.rnn", "kind": "recurrent", "mean": 0.1, "std": 0.5, "saturated_frac": 0.25,
         "dead_frac": None, "attn_max_logit": None, "attn_entropy": None, "z_lse": None,
         "grad_time": [[0, 1e-3 * step], [8, 0.01], [15, 0.1]], "grad_time_ratio": 1e-2 * step},
        {"site": "head", "kind": "output", "mean": 0.0, "std": 1.0, "saturated_frac": None, "dead_frac": None,
         "attn_max_logit": None, "attn_entropy": None, "z_lse": 5.0 + step, "grad_time": None,
         "grad_time_ratio": None},
    ]


def test_activation_records_round_trip_and_stay_bounded_over_100k_steps(monkeypatch):
    history = RunHistory()
    for step in range(10, 100_001, 10):  # activation stats every 10 steps of a 100k-step run
        history.add_activations(step, _activation_rows(step))
    assert len(history.act_steps) <= monitor.MAX_LAYER_RECORDS
    assert history.act_steps[0] == 10 and history.act_steps[-1] > 99_000
    rows = history.activations
    first_rnn, first_head = rows[0], rows[1]
    assert first_rnn["grad_time"] == [[0, 1e-2], [8, 0.01], [15, 0.1]]
    assert first_rnn["grad_time_ratio"] == pytest.approx(0.1) and first_rnn["dead_frac"] is None
    assert first_head["z_lse"] == 15.0 and first_head["grad_time"] is None
    buffer = io.BytesIO()
    torch.save(history.state_dict(), buffer)
    buffer.seek(0)
    restored = RunHistory()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.activations == rows
    restored.truncate_after(50_000)
    assert restored.act_steps[-1] <= 50_000 < history.act_steps[-1]
