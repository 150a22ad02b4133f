"""Small specs and a recording callback shared by the engine tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from worker.engine.config import JobSpec, parse_spec
from worker.engine.trainer import Callbacks

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"


def corpus(n_chars: int | None = 40_000) -> str:
    text = CORPUS.read_text(encoding="utf-8")
    return text if n_chars is None else text[:n_chars]


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


BASE: dict[str, Any] = {
    "model": {"arch": "lstm", "n_layers": 1, "d_model": 16, "hidden": 32},
    "training": {"max_steps": 20, "batch_size": 8, "seq_len": 16, "lr": 3e-3, "eval_every": 1000},
    "stabilization": {"clip": {"mode": "norm", "max_norm": 1.0}},
    "monitoring": {"layer_stats_every": 5},
    "checkpointing": {"every_steps": 1000, "keep_last": 3},
}


def spec(**sections: Any) -> JobSpec:
    """BASE with nested overrides, e.g. spec(model={"arch": "mlp"})."""
    return parse_spec(merge(BASE, sections))


class Recorder(Callbacks):
    """Keeps everything the trainer reports; can stop the run at a given step."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.layers: list[dict[str, Any]] = []
        self.acts: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.removed: list[dict[str, Any]] = []
        self.diagnoses: list[tuple[int, str]] = []
        self.stop_at = stop_at

    def on_metrics(self, rows: list[dict[str, Any]]) -> None:
        self.rows.extend(rows)

    def on_layer_stats(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.layers.extend({"step": step, **r} for r in rows)

    def on_activation_stats(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.acts.extend({"step": step, **r} for r in rows)

    def on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        self.checkpoints.append(info)

    def on_checkpoint_removed(self, info: dict[str, Any]) -> None:
        self.removed.append(info)

    def on_diagnosis(self, findings: list[dict[str, Any]], summary: str) -> None:
        self.diagnoses.append((self.rows[-1]["step"], summary))

    def should_stop(self) -> bool:
        return self.stop_at is not None and bool(self.rows) and self.rows[-1]["step"] >= self.stop_at

    def kinds(self) -> list[str]:
        return [e["kind"] for e in self.events]
