"""The API's pure-python parameter estimate tracks the engine's real models."""

from __future__ import annotations

import itertools

import pytest

from app.services.params import estimate_params


def test_estimate_is_pure_and_monotonic() -> None:
    small = {"arch": "transformer", "n_layers": 2, "d_model": 64, "n_heads": 4, "norm": "layernorm",
             "tie_embeddings": False}
    big = {**small, "n_layers": 4}
    assert 0 < estimate_params(small, 64) < estimate_params(big, 64)
    huge = {**small, "n_layers": 64, "d_model": 4096}
    assert estimate_params(huge, 64) > 12 * 64 * 4096 * 4096


@pytest.mark.parametrize(("arch", "norm", "tie"), itertools.product(
    ["mlp", "rnn", "gru", "lstm", "transformer"], ["none", "layernorm"], [False, True]))
def test_estimate_matches_engine(arch: str, norm: str, tie: bool) -> None:
    pytest.importorskip("torch")
    config = pytest.importorskip("worker.engine.config")
    models = pytest.importorskip("worker.engine.models")
    spec = config.parse_spec({"model": {"arch": arch, "norm": norm, "tie_embeddings": tie, "n_layers": 3,
                                        "d_model": 64, "hidden": 64 if tie else 96},
                              "training": {"seq_len": 32}})
    actual = sum(p.numel() for p in models.build_model(spec.model, 256, 32).parameters())
    estimate = estimate_params(config.spec_to_dict(spec)["model"], 32)
    assert abs(estimate - actual) / actual < 0.05, (estimate, actual)
