"""LR range test on a real tiny model: the curve's landmarks, and that its recommendation trains well."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from tests.engine.spec_helpers import Recorder, corpus, spec
from worker.engine import lr_probe
from worker.engine.config import parse_spec, spec_to_dict
from worker.engine.trainer import Trainer

PROBE_SPEC = dict(model={"arch": "mlp", "n_layers": 2, "d_model": 16, "hidden": 64, "context": 4},
                  training={"max_steps": 60, "batch_size": 16, "seq_len": 16, "optimizer": "adamw"},
                  stabilization={"clip": {"mode": "none"}})


def _final_loss(tmp: Path, lr: float) -> float:
    job = spec(**{**PROBE_SPEC, "training": {**PROBE_SPEC["training"], "lr": lr}})
    cb = Recorder()
    Trainer(job, corpus(), tmp, callbacks=cb).run()
    last = [r["loss"] for r in cb.rows[-10:]]
    return math.inf if any(not math.isfinite(v) for v in last) else sum(last) / len(last)


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    return lr_probe.lr_range_test(spec(**PROBE_SPEC), corpus(), lr_min=1e-5, lr_max=10.0, steps=150)


def test_curve_landmarks(probe: dict[str, Any]) -> None:
    assert probe["divergence_lr"] is not None, "AdamW at lr 10 must diverge"
    assert probe["steepest_lr"] < probe["divergence_lr"]
    assert 1e-5 <= probe["steepest_lr"] <= 10
    lrs = [p["lr"] for p in probe["curve"]]
    assert lrs == sorted(lrs) and math.isclose(lrs[0], 1e-5)
    # stopped early: the last point is the divergence
    assert probe["steps_run"] < 150 and math.isclose(lrs[-1], probe["divergence_lr"])
    # bias-corrected EMA: the first smoothed value is the first loss itself (not pulled toward 0)
    assert math.isclose(probe["curve"][0]["smoothed"], probe["curve"][0]["loss"], rel_tol=1e-9)
    rec = probe["recommended"]
    assert rec["field"] == "training.lr"
    assert rec["value"] <= probe["divergence_lr"] / lr_probe.DIVERGENCE_MARGIN * 1.001
    # the patch is a valid spec change (as retry's overrides apply it)
    patched = spec_to_dict(spec(**PROBE_SPEC))
    patched["training"]["lr"] = rec["value"]
    assert parse_spec(patched).training.lr == rec["value"]


def test_recommended_lr_trains_better_than_past_divergence(probe: dict[str, Any], tmp_path: Path) -> None:
    good = _final_loss(tmp_path / "good", probe["recommended"]["value"])
    bad = _final_loss(tmp_path / "bad", 10 * probe["divergence_lr"])
    initial = math.log(256)
    assert good < initial - 1.0, good
    assert good < bad, (good, bad)


def test_probe_is_deterministic_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    job = dataclasses.replace(spec(**PROBE_SPEC))
    a = lr_probe.lr_range_test(job, corpus(), lr_min=1e-4, lr_max=1.0, steps=20)
    b = lr_probe.lr_range_test(job, corpus(), lr_min=1e-4, lr_max=1.0, steps=20)
    assert a["curve"] == b["curve"]
    assert list(tmp_path.iterdir()) == []


def test_steepest_slope_on_a_known_curve() -> None:
    # loss falls fastest around lr 1e-2 (a logistic step in log lr), then blows up
    lrs = lr_probe.geometric_lrs(1e-5, 1.0, 60)
    curve = [{"lr": lr, "smoothed": 3 - 2 / (1 + math.exp(-3 * (math.log10(lr) + 2)))} for lr in lrs]
    steepest = lr_probe.steepest_descent_lr(curve)
    assert 10 ** -2.2 < steepest < 10 ** -1.8
    assert lr_probe.recommended_lr(steepest, 0.05) == pytest.approx(0.005)
    assert lr_probe.recommended_lr(steepest, None) == pytest.approx(float(f"{steepest:.3g}"))
    assert lr_probe.recommended_lr(None, None) is None
