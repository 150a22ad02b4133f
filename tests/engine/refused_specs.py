"""Every kind of spec the engine refuses, with the field path its SpecError names.

Pure standard library (no torch), so the API tests use the same list to check that the HTTP layer
refuses each one with the same path.
"""

from __future__ import annotations

import typing
from typing import Any

from worker.engine import config


def _nested(path: str, value: Any) -> dict[str, Any]:
    """{"a": {"b": value}} from "a.b"."""
    out: dict[str, Any] = value
    for part in reversed(path.split(".")):
        out = {part: out}
    return out


def _hint(path: str) -> Any:
    cls: Any = config.JobSpec
    hint: Any = None
    for part in path.split("."):
        hint = typing.get_type_hints(cls)[part]
        cls = hint
    return hint


def _outside(bound: config.Bound, integer: bool) -> list[float]:
    """Values just outside each bounded side."""
    step = 1 if integer else 0.5
    values = []
    if bound.lo is not None:
        values.append(bound.lo if bound.lo_open else bound.lo - step)
    if bound.hi is not None:
        values.append(bound.hi if bound.hi_open else bound.hi + step)
    return values


def rule_cases() -> list[tuple[dict[str, Any], str]]:
    """A violation of each side of every bound in config.RULES."""
    cases = []
    for path, bound in config.RULES.items():
        hint = _hint(path)
        if typing.get_origin(hint) is tuple:  # each element checked: break the first
            cases += [(_nested(path, [v, 0.5]), f"{path}.0") for v in _outside(bound, integer=False)]
            continue
        integer = int in (hint, *typing.get_args(hint))
        cases += [(_nested(path, v), path) for v in _outside(bound, integer)]
    return cases


# Cross-field checks and options that cannot apply to the chosen architecture or init scheme.
CONSISTENCY_CASES: list[tuple[dict[str, Any], str]] = [
    ({"training": {"max_steps": 10, "warmup_steps": 11}}, "training.warmup_steps"),
    ({"name": ""}, "name"),
    ({"model": {"arch": "transformer", "d_model": 64, "n_heads": 5}}, "model.n_heads"),
    ({"model": {"arch": "rnn", "activation": "gelu"}}, "model.activation"),
    ({"model": {"arch": "gru", "activation": "relu"}}, "model.activation"),
    ({"model": {"arch": "lstm", "activation": "sigmoid"}}, "model.activation"),
    ({"model": {"arch": "lstm", "norm": "batchnorm"}}, "model.norm"),
    ({"model": {"arch": "transformer", "norm": "batchnorm"}}, "model.norm"),
    ({"model": {"arch": "lstm", "context": 16}}, "model.context"),
    ({"model": {"arch": "transformer", "context": 16}}, "model.context"),
    ({"model": {"arch": "mlp", "n_heads": 2}}, "model.n_heads"),
    ({"model": {"arch": "gru", "n_heads": 2}}, "model.n_heads"),
    ({"model": {"arch": "lstm", "qk_norm": True}}, "model.qk_norm"),
    ({"model": {"arch": "mlp", "recurrent_init": "orthogonal"}}, "model.recurrent_init"),
    ({"model": {"arch": "transformer", "recurrent_init": "orthogonal"}}, "model.recurrent_init"),
    ({"model": {"arch": "gru", "forget_bias": 1.0}}, "model.forget_bias"),
    ({"model": {"arch": "mlp", "forget_bias": 1.0}}, "model.forget_bias"),
    ({"model": {"arch": "lstm", "norm": "none", "norm_position": "post"}}, "model.norm_position"),
    ({"model": {"arch": "mlp", "norm_position": "post"}}, "model.norm_position"),
    ({"model": {"init": "xavier_uniform", "init_std": 0.05}}, "model.init_std"),
    ({"model": {"init": "default", "init_std": 0.05}}, "model.init_std"),
    ({"model": {"init": "default", "init_gain": 2.0}}, "model.init_gain"),
    ({"model": {"init": "normal", "init_gain": 2.0}}, "model.init_gain"),
    ({"model": {"arch": "lstm", "d_model": 32, "hidden": 64, "tie_embeddings": True}}, "model.tie_embeddings"),
    ({"model": {"arch": "mlp", "d_model": 32, "tie_embeddings": True}}, "model.tie_embeddings"),
    ({"model": {"arch": "lstm", "residual": True, "depth_scaled_init": True}}, "model.depth_scaled_init"),
    ({"model": {"arch": "mlp", "residual": False, "depth_scaled_init": True}}, "model.depth_scaled_init"),
    ({"model": {"arch": "transformer", "residual": False, "depth_scaled_init": True}}, "model.depth_scaled_init"),
    ({"training": {"optimizer": "adamw", "momentum": 0.5}}, "training.momentum"),
    ({"training": {"optimizer": "sgd", "betas": [0.8, 0.99]}}, "training.betas"),
    ({"training": {"schedule": "constant", "min_lr_ratio": 0.5}}, "training.min_lr_ratio"),
    ({"stabilization": {"clip": {"mode": "value", "max_norm": 2.0}}}, "stabilization.clip.max_norm"),
    ({"stabilization": {"clip": {"mode": "none", "max_norm": 2.0}}}, "stabilization.clip.max_norm"),
    ({"stabilization": {"clip": {"mode": "norm", "clip_value": 0.5}}}, "stabilization.clip.clip_value"),
    ({"stabilization": {"clip": {"mode": "norm", "agc_factor": 0.1}}}, "stabilization.clip.agc_factor"),
    ({"stabilization": {"clip": {"mode": "adaptive", "agc_eps": 0.1}}}, "stabilization.clip.agc_eps"),
    ({"stabilization": {"clip": {"mode": "norm", "adaptive_method": "zscore"}}}, "stabilization.clip.adaptive_method"),
    ({"stabilization": {"clip": {"mode": "agc", "adaptive_warmup": 5}}}, "stabilization.clip.adaptive_warmup"),
    ({"stabilization": {"clip": {"mode": "norm", "percentile": 50.0}}}, "stabilization.clip.percentile"),
    ({"stabilization": {"clip": {"mode": "adaptive", "adaptive_method": "zscore", "percentile": 50.0}}},
     "stabilization.clip.percentile"),
    ({"stabilization": {"clip": {"mode": "adaptive", "z_thresh": 3.0}}}, "stabilization.clip.z_thresh"),
    ({"stabilization": {"clip": {"mode": "adaptive", "ema_alpha": 0.9}}}, "stabilization.clip.ema_alpha"),
    ({"stabilization": {"on_explosion": "skip", "rollback_lr_factor": 0.1}}, "stabilization.rollback_lr_factor"),
    ({"stabilization": {"on_explosion": "none", "max_rollbacks": 2}}, "stabilization.max_rollbacks"),
]

# Type errors and unknown keys.
TYPE_CASES: list[tuple[dict[str, Any], str]] = [
    ({"model": {"n_layers": "2"}}, "model.n_layers"),
    ({"model": {"n_layers": 2.5}}, "model.n_layers"),
    ({"model": {"residual": 1}}, "model.residual"),
    ({"model": {"arch": "cnn"}}, "model.arch"),
    ({"model": {"activation": "swish"}}, "model.activation"),
    ({"model": {"bogus": 1}}, "model.bogus"),
    ({"training": {"betas": [0.9]}}, "training.betas"),
    ({"training": {"betas": [0.9, "x"]}}, "training.betas.1"),
]
# Values JSON cannot carry (the API refuses the body before any field is read).
NON_JSON_CASES: list[tuple[dict[str, Any], str]] = [
    ({"training": {"lr": float("nan")}}, "training.lr"),
    ({"stabilization": {"clip": {"max_norm": float("inf")}}}, "stabilization.clip.max_norm"),
]


def refused_cases() -> list[tuple[dict[str, Any], str]]:
    """(spec fragment, path named by the refusal) for every rule, consistency check and JSON type check."""
    return rule_cases() + CONSISTENCY_CASES + TYPE_CASES


def case_id(case: tuple[dict[str, Any], str]) -> str:
    return f"{case[1]}={case[0]!r}"[:90]
