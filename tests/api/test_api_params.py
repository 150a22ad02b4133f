"""The API's pure-python parameter estimate tracks the engine's real models."""

from __future__ import annotations

import itertools

import pytest

from app.services.params import estimate_params


def _model(**fields: object) -> dict:
    from worker.engine.config import parse_spec, spec_to_dict
    return spec_to_dict(parse_spec({"model": fields}))["model"]


def test_estimate_is_pure_and_monotonic() -> None:
    small = _model(arch="transformer", n_layers=2, d_model=64, n_heads=4, norm="layernorm")
    big = {**small, "n_layers": 4}
    assert 0 < estimate_params(small, 64) < estimate_params(big, 64)
    huge = _model(arch="transformer", n_layers=64, d_model=4096, n_heads=4, norm="layernorm")
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
    assert estimate == actual
