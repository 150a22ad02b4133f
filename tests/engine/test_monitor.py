"""Run history stays bounded and round-trips through checkpoints."""

from __future__ import annotations

import io

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
