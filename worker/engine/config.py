"""Job spec: typed, validated configuration of one training run.

Pure standard library so that anything (CLI, worker, tests) can parse a spec
without importing torch. Unknown keys are errors, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

ARCHS = ("mlp", "rnn", "gru", "lstm", "transformer")
ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "gelu", "silu", "elu")
NORMS = ("none", "batchnorm", "layernorm", "rmsnorm")
INITS = (
    "default",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "orthogonal",
    "normal",
)


class SpecError(ValueError):
    """A spec that cannot be trained; `path` names the offending field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


@dataclass
class ModelConfig:
    arch: Literal["mlp", "rnn", "gru", "lstm", "transformer"] = "lstm"
    n_layers: int = 2
    d_model: int = 64
    hidden: int = 128
    context: int = 8
    n_heads: int = 4
    activation: str = "tanh"
    norm: str = "none"
    norm_position: Literal["pre", "post"] = "pre"
    # None: the architecture's usual choice (on for transformers, off otherwise)
    residual: bool | None = None
    qk_norm: bool = False
    init: str = "default"
    init_std: float = 0.02
    init_gain: float = 1.0
    recurrent_init: Literal["default", "orthogonal"] = "default"
    forget_bias: float = 0.0
    dropout: float = 0.0
    tie_embeddings: bool = False


@dataclass
class TokenizerConfig:
    kind: Literal["byte", "char", "bpe"] = "byte"
    # bpe only: the most ids a byte-level BPE trained on the dataset may have (256 bytes + merges)
    vocab_size: int = 1024


@dataclass
class TrainingConfig:
    max_steps: int = 200
    batch_size: int = 16
    seq_len: int = 64
    grad_accum_steps: int = 1
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    eval_every: int = 50
    eval_batches: int = 4
    val_fraction: float = 0.1
    seed: int = 0


@dataclass
class ClipConfig:
    mode: Literal["none", "norm", "value", "agc", "adaptive"] = "norm"
    max_norm: float = 1.0
    norm_type: float = 2.0
    clip_value: float = 1.0
    agc_factor: float = 0.01
    agc_eps: float = 1e-3
    # adaptive: threshold learned from this run's own grad-norm history
    adaptive_method: Literal["percentile", "zscore"] = "percentile"
    percentile: float = 90.0
    z_thresh: float = 2.5
    ema_alpha: float = 0.97
    adaptive_warmup: int = 25


@dataclass
class StabilizationConfig:
    clip: ClipConfig = field(default_factory=ClipConfig)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    nonfinite: Literal["skip", "stop"] = "skip"
    max_consecutive_skips: int = 10
    on_explosion: Literal["none", "skip", "rollback"] = "none"
    # a step "explodes" when its grad norm is this many times the recent median
    explosion_factor: float = 10.0
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 5
    weight_max_norm: float | None = None


@dataclass
class MonitoringConfig:
    layer_stats_every: int = 10
    # forward-hook activation statistics (and, for rnn/gru/lstm, gradients through time)
    # every layer_stats_every steps
    activation_stats: bool = True
    # rows of a spiking batch named by per-example loss in the spike's event (0: none)
    attribution_top_k: int = 4


@dataclass
class CheckpointingConfig:
    every_steps: int = 100
    keep_last: int = 3


@dataclass
class JobSpec:
    name: str = "run"
    dataset_id: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    stabilization: StabilizationConfig = field(default_factory=StabilizationConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)


# Checks beyond the type, per field: (predicate, message).
_RULES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "model.n_layers": (lambda v: 1 <= v <= 64, "must be between 1 and 64"),
    "model.d_model": (lambda v: 1 <= v <= 4096, "must be between 1 and 4096"),
    "model.hidden": (lambda v: 1 <= v <= 8192, "must be between 1 and 8192"),
    "model.context": (lambda v: 1 <= v <= 512, "must be between 1 and 512"),
    "model.n_heads": (lambda v: v >= 1, "must be at least 1"),
    "model.activation": (lambda v: v in ACTIVATIONS, f"must be one of {', '.join(ACTIVATIONS)}"),
    "model.norm": (lambda v: v in NORMS, f"must be one of {', '.join(NORMS)}"),
    "model.init": (lambda v: v in INITS, f"must be one of {', '.join(INITS)}"),
    "model.init_std": (lambda v: 0 < v <= 10, "must be in (0, 10]"),
    "model.init_gain": (lambda v: 0 < v <= 100, "must be in (0, 100]"),
    "model.dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "tokenizer.vocab_size": (lambda v: 257 <= v <= 65536, "must be between 257 and 65536"),
    "training.max_steps": (lambda v: 1 <= v <= 10_000_000, "must be between 1 and 10000000"),
    "training.batch_size": (lambda v: 1 <= v <= 4096, "must be between 1 and 4096"),
    "training.seq_len": (lambda v: 2 <= v <= 8192, "must be between 2 and 8192"),
    "training.grad_accum_steps": (lambda v: 1 <= v <= 1024, "must be between 1 and 1024"),
    "training.lr": (lambda v: 0 < v <= 100, "must be in (0, 100]"),
    "training.momentum": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "training.betas": (lambda v: all(0 <= b < 1 for b in v), "each must be in [0, 1)"),
    "training.weight_decay": (lambda v: 0 <= v <= 10, "must be in [0, 10]"),
    "training.warmup_steps": (lambda v: v >= 0, "must be >= 0"),
    "training.min_lr_ratio": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "training.eval_every": (lambda v: v >= 1, "must be >= 1"),
    "training.eval_batches": (lambda v: 1 <= v <= 1000, "must be between 1 and 1000"),
    "training.val_fraction": (lambda v: 0 < v < 0.5, "must be in (0, 0.5)"),
    "training.seed": (lambda v: 0 <= v < 2**63, "must be a non-negative 64-bit integer"),
    "stabilization.clip.max_norm": (lambda v: v > 0, "must be > 0"),
    "stabilization.clip.norm_type": (lambda v: v > 0, "must be > 0 (inf allowed)"),
    "stabilization.clip.clip_value": (lambda v: v > 0, "must be > 0"),
    "stabilization.clip.agc_factor": (lambda v: v > 0, "must be > 0"),
    "stabilization.clip.agc_eps": (lambda v: v > 0, "must be > 0"),
    "stabilization.clip.percentile": (lambda v: 0 < v <= 100, "must be in (0, 100]"),
    "stabilization.clip.z_thresh": (lambda v: v > 0, "must be > 0"),
    "stabilization.clip.ema_alpha": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "stabilization.clip.adaptive_warmup": (lambda v: v >= 1, "must be >= 1"),
    "stabilization.max_consecutive_skips": (lambda v: v >= 1, "must be >= 1"),
    "stabilization.explosion_factor": (lambda v: v > 1, "must be > 1"),
    "stabilization.rollback_lr_factor": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "stabilization.max_rollbacks": (lambda v: v >= 0, "must be >= 0"),
    "stabilization.weight_max_norm": (lambda v: v is None or v > 0, "must be > 0 or null"),
    "monitoring.layer_stats_every": (lambda v: v >= 1, "must be >= 1"),
    "monitoring.attribution_top_k": (lambda v: 0 <= v <= 64, "must be between 0 and 64"),
    "checkpointing.every_steps": (lambda v: v >= 1, "must be >= 1"),
    "checkpointing.keep_last": (lambda v: 1 <= v <= 100, "must be between 1 and 100"),
}


def parse_spec(raw: Any) -> JobSpec:
    """Build a JobSpec from a JSON-like mapping; raise SpecError naming the field."""
    spec = _build(JobSpec, raw, "")
    if spec.model.residual is None:
        spec.model.residual = spec.model.arch == "transformer"
    _check_rules(spec)
    _check_consistency(spec)
    return spec


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    """JSON-ready dict of a spec (tuples become lists)."""
    return _jsonable(dataclasses.asdict(spec))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _build(cls: type, raw: Any, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(path, "must be an object")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise SpecError(where, "unknown field")
    values = {}
    for name, value in raw.items():
        sub = f"{path}.{name}" if path else name
        values[name] = _coerce(hints[name], value, sub)
    return cls(**values)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(inner, value, path)
    if origin is Literal:
        if value not in args:
            raise SpecError(path, f"must be one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise SpecError(path, f"must be a list of {len(args)} numbers")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(path, "must be a boolean")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(path, "must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(path, "must be a number")
        if math.isnan(value) or (math.isinf(value) and not path.endswith("norm_type")):
            raise SpecError(path, "must be finite")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SpecError(path, "must be a string")
        return value
    raise SpecError(path, f"unsupported type {hint!r}")  # pragma: no cover


def _get(spec: JobSpec, path: str) -> Any:
    obj: Any = spec
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _check_rules(spec: JobSpec) -> None:
    for path, (ok, message) in _RULES.items():
        if not ok(_get(spec, path)):
            raise SpecError(path, message)
    if not spec.name or len(spec.name) > 200:
        raise SpecError("name", "must be 1 to 200 characters")


def _check_consistency(spec: JobSpec) -> None:
    m = spec.model
    if m.arch == "transformer" and m.d_model % m.n_heads:
        raise SpecError("model.n_heads", f"must divide model.d_model ({m.d_model})")
    if m.arch == "rnn" and m.activation not in ("tanh", "relu"):
        raise SpecError("model.activation", "a vanilla rnn supports tanh or relu")
    if m.arch in ("transformer", "rnn", "gru", "lstm") and m.norm == "batchnorm":
        raise SpecError("model.norm", "batchnorm is only supported for mlp; use layernorm or rmsnorm")
    if spec.training.warmup_steps > spec.training.max_steps:
        raise SpecError("training.warmup_steps", "must not exceed training.max_steps")
