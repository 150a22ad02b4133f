"""Job spec: typed, validated configuration of one training run.

Pure standard library so that anything (CLI, worker, tests) can parse a spec
without importing torch. Unknown keys are errors, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class SpecError(ValueError):
    """A spec that cannot be trained; `path` names the offending field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


@dataclass
class ModelConfig:
    """Architecture and initialisation. Options that only some architectures (or schemes) use are
    refused by parse_spec when set to a non-default value where they cannot apply."""

    arch: Literal["mlp", "rnn", "gru", "lstm", "transformer"] = "lstm"
    n_layers: int = 2
    d_model: int = 64
    # width of each mlp block, of each recurrent layer, or of a transformer's FFN;
    # None: the architecture's usual width (4 * d_model for transformers, 128 otherwise)
    hidden: int | None = None
    context: int = 8  # mlp only: tokens the model sees
    n_heads: int = 4  # transformer only
    # None: the architecture's usual choice (gelu and layernorm for transformers, which makes the
    # default transformer a GPT-2 that the Hugging Face export maps; tanh and no norm otherwise)
    activation: Literal["sigmoid", "tanh", "relu", "leaky_relu", "gelu", "silu", "elu"] | None = None
    norm: Literal["none", "batchnorm", "layernorm", "rmsnorm"] | None = None
    norm_position: Literal["pre", "post"] = "pre"
    # None: the architecture's usual choice (on for transformers, off otherwise)
    residual: bool | None = None
    qk_norm: bool = False  # transformer only
    init: Literal[
        "default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal", "normal"
    ] = "default"
    init_std: float = 0.02  # init normal only
    init_gain: float = 1.0  # xavier_*, kaiming_*, orthogonal only
    recurrent_init: Literal["default", "orthogonal"] = "default"  # rnn, gru, lstm only
    forget_bias: float = 0.0  # lstm only
    dropout: float = 0.0
    tie_embeddings: bool = False
    # GPT-2 style: residual branches' output projections scaled by 1/sqrt(2 * n_layers)
    depth_scaled_init: bool = False


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
class ResourcesConfig:
    # devices (GPUs, or gloo processes on CPU) of one worker that train this job as data-parallel ranks;
    # training.batch_size stays the global batch and must be divisible by it
    devices: int = 1


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
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


@dataclass(frozen=True)
class Bound:
    """An interval a number must lie in (each element, for a tuple); None on a side: unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __call__(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    @property
    def message(self) -> str:
        """The refusal's wording, e.g. 'must be between 1 and 64' or 'must be in (0, 10]'."""
        if self.lo is None:
            return f"must be {'<' if self.hi_open else '<='} {self.hi}"
        if self.hi is None:
            return f"must be {'>' if self.lo_open else '>='} {self.lo}"
        if not (self.lo_open or self.hi_open) and isinstance(self.lo, int) and isinstance(self.hi, int):
            return f"must be between {self.lo} and {self.hi}"
        return f"must be in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"


def _between(lo: float, hi: float) -> Bound:
    return Bound(lo, hi)


def _above(lo: float) -> Bound:
    return Bound(lo, None, lo_open=True)


def _at_least(lo: float) -> Bound:
    return Bound(lo, None)


# Numeric bounds beyond the type, per field. The API's OpenAPI schema is generated from these.
# A null (where the field allows it) passes; a tuple's elements are checked one by one.
RULES: dict[str, Bound] = {
    "model.n_layers": _between(1, 64),
    "model.d_model": _between(1, 4096),
    # up to 4 * the largest d_model: a transformer's default FFN width
    "model.hidden": _between(1, 16384),
    "model.context": _between(1, 512),
    "model.n_heads": _at_least(1),
    "model.init_std": Bound(0, 10, lo_open=True),
    "model.init_gain": Bound(0, 100, lo_open=True),
    "model.dropout": Bound(0, 1, hi_open=True),
    "tokenizer.vocab_size": _between(257, 65536),
    "training.max_steps": _between(1, 10_000_000),
    "training.batch_size": _between(1, 4096),
    "training.seq_len": _between(2, 8192),
    "training.grad_accum_steps": _between(1, 1024),
    "training.lr": Bound(0, 100, lo_open=True),
    "training.momentum": Bound(0, 1, hi_open=True),
    "training.betas": Bound(0, 1, hi_open=True),
    "training.weight_decay": _between(0, 10),
    "training.warmup_steps": _at_least(0),
    "training.min_lr_ratio": _between(0, 1),
    "training.eval_every": _at_least(1),
    "training.eval_batches": _between(1, 1000),
    "training.val_fraction": Bound(0, 0.5, lo_open=True, hi_open=True),
    "training.seed": _between(0, 2**63 - 1),
    "stabilization.clip.max_norm": _above(0),
    "stabilization.clip.norm_type": _above(0),
    "stabilization.clip.clip_value": _above(0),
    "stabilization.clip.agc_factor": _above(0),
    "stabilization.clip.agc_eps": _above(0),
    "stabilization.clip.percentile": Bound(0, 100, lo_open=True),
    "stabilization.clip.z_thresh": _above(0),
    "stabilization.clip.ema_alpha": Bound(0, 1, lo_open=True, hi_open=True),
    "stabilization.clip.adaptive_warmup": _at_least(1),
    "stabilization.max_consecutive_skips": _at_least(1),
    "stabilization.explosion_factor": _above(1),
    "stabilization.rollback_lr_factor": Bound(0, 1, lo_open=True, hi_open=True),
    "stabilization.max_rollbacks": _at_least(0),
    "stabilization.weight_max_norm": _above(0),
    "monitoring.layer_stats_every": _at_least(1),
    "monitoring.attribution_top_k": _between(0, 64),
    "checkpointing.every_steps": _at_least(1),
    "checkpointing.keep_last": _between(1, 100),
    "resources.devices": _between(1, 64),
}
NAME_MAX_CHARS = 200
# Floats that may be infinite (an inf-norm clip); every other float must be finite.
INFINITE_OK = frozenset({"stabilization.clip.norm_type"})


def _choices(cls: type, name: str) -> tuple[str, ...]:
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # Literal[...] | None
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_args(hint)


ARCHS = _choices(ModelConfig, "arch")
ACTIVATIONS = _choices(ModelConfig, "activation")
NORMS = _choices(ModelConfig, "norm")
INITS = _choices(ModelConfig, "init")
# Schemes that take a gain (model.init_gain); default and normal have none.
GAINED_INITS = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal")
RECURRENT_ARCHS = ("rnn", "gru", "lstm")
_CLIP_MODE = "stabilization.clip.mode"
# Options that only act under some values of other fields (every condition must hold). Set to
# anything but its default elsewhere, such an option is refused rather than silently ignored.
APPLIES_WHEN: dict[str, tuple[tuple[str, tuple[Any, ...]], ...]] = {
    "model.context": (("model.arch", ("mlp",)),),
    "model.n_heads": (("model.arch", ("transformer",)),),
    "model.qk_norm": (("model.arch", ("transformer",)),),
    "model.recurrent_init": (("model.arch", RECURRENT_ARCHS),),
    "model.forget_bias": (("model.arch", ("lstm",)),),
    "model.norm_position": (("model.norm", ("batchnorm", "layernorm", "rmsnorm")),),
    "model.init_std": (("model.init", ("normal",)),),
    "model.init_gain": (("model.init", GAINED_INITS),),
    "tokenizer.vocab_size": (("tokenizer.kind", ("bpe",)),),
    "training.momentum": (("training.optimizer", ("sgd",)),),
    "training.betas": (("training.optimizer", ("adam", "adamw")),),
    "training.min_lr_ratio": (("training.schedule", ("linear", "cosine")),),
    "stabilization.clip.max_norm": ((_CLIP_MODE, ("norm",)),),
    "stabilization.clip.clip_value": ((_CLIP_MODE, ("value",)),),
    "stabilization.clip.agc_factor": ((_CLIP_MODE, ("agc",)),),
    "stabilization.clip.agc_eps": ((_CLIP_MODE, ("agc",)),),
    "stabilization.clip.adaptive_method": ((_CLIP_MODE, ("adaptive",)),),
    "stabilization.clip.adaptive_warmup": ((_CLIP_MODE, ("adaptive",)),),
    "stabilization.clip.percentile": ((_CLIP_MODE, ("adaptive",)), ("stabilization.clip.adaptive_method", ("percentile",))),
    "stabilization.clip.z_thresh": ((_CLIP_MODE, ("adaptive",)), ("stabilization.clip.adaptive_method", ("zscore",))),
    "stabilization.clip.ema_alpha": ((_CLIP_MODE, ("adaptive",)), ("stabilization.clip.adaptive_method", ("zscore",))),
    "stabilization.rollback_lr_factor": (("stabilization.on_explosion", ("rollback",)),),
    "stabilization.max_rollbacks": (("stabilization.on_explosion", ("rollback",)),),
}


def upgrade_legacy_spec(raw: Any) -> Any:
    """A spec stored before `model.hidden` set the transformer's FFN width trained a 4 * d_model FFN,
    whatever its `hidden` said; such specs (and their checkpoints) predate `model.depth_scaled_init`,
    which is how they are told apart. Migration 0008 applies the same rule to stored jobs."""
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or model.get("arch") != "transformer" or "depth_scaled_init" in model:
        return raw
    d_model = model.get("d_model", ModelConfig.d_model)
    return {**raw, "model": {**model, "hidden": 4 * d_model if isinstance(d_model, int) else d_model}}


def parse_spec(raw: Any) -> JobSpec:
    """Build a JobSpec from a JSON-like mapping; raise SpecError naming the field."""
    spec = _build(JobSpec, raw, "")
    _check_rules(spec)
    # before the consistency checks, which judge options by the resolved norm and activation
    resolve_model_defaults(spec.model)
    _check_consistency(spec)
    _check_model(spec.model)
    return spec


def resolve_model_defaults(m: ModelConfig) -> ModelConfig:
    """Fill the architecture-dependent defaults (null residual, hidden, activation, norm) in place."""
    transformer = m.arch == "transformer"
    if m.activation is None:
        m.activation = "gelu" if transformer else "tanh"
    if m.norm is None:
        m.norm = "layernorm" if transformer else "none"
    if m.residual is None:
        m.residual = m.arch == "transformer"
    if m.hidden is None:
        m.hidden = 4 * m.d_model if m.arch == "transformer" else 128
    return m


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
    hints = _type_hints(cls)
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


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # get_type_hints evaluates every string annotation anew: half of parse_spec's time uncached
    return typing.get_type_hints(cls)


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
        return tuple(_coerce(a, v, f"{path}.{i}") for i, (a, v) in enumerate(zip(args, value, strict=True)))
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
        if math.isnan(value) or (math.isinf(value) and path not in INFINITE_OK):
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
    for path, bound in RULES.items():
        value = _get(spec, path)
        for i, v in enumerate(value) if isinstance(value, tuple) else [(None, value)]:
            if v is not None and not bound(v):
                raise SpecError(path if i is None else f"{path}.{i}", bound.message)
    if not spec.name or len(spec.name) > NAME_MAX_CHARS:
        raise SpecError("name", f"must be 1 to {NAME_MAX_CHARS} characters")


def _check_consistency(spec: JobSpec) -> None:
    if spec.training.warmup_steps > spec.training.max_steps:
        raise SpecError("training.warmup_steps", "must not exceed training.max_steps")
    _check_devices(spec)
    _check_applicable(spec)


def _check_devices(spec: JobSpec) -> None:
    """Data parallelism keeps the single-device run's meaning: equal shards of the global batch (so the
    ranks' averaged gradient is the full batch's mean gradient) and no per-shard batch statistics."""
    devices = spec.resources.devices
    if devices == 1:
        return
    if spec.training.batch_size % devices:
        raise SpecError("training.batch_size",
                        f"must be divisible by resources.devices ({devices}): each device takes an equal share "
                        "of the global batch")
    if spec.model.norm == "batchnorm":
        raise SpecError("model.norm", "batchnorm would normalize each device's share of the batch separately; "
                                      "use layernorm or rmsnorm with resources.devices above 1")


def _check_applicable(spec: JobSpec) -> None:
    """Refuse an option set away from its default where nothing reads it (APPLIES_WHEN)."""
    defaults = JobSpec()
    for path, conditions in APPLIES_WHEN.items():
        if _get(spec, path) == _get(defaults, path):
            continue
        for control, values in conditions:
            if _get(spec, control) not in values:
                raise SpecError(
                    path, f"only applies when {control} is {' or '.join(map(str, values))}; leave it unset otherwise"
                )


def _check_model(m: ModelConfig) -> None:
    """Refuse model options that the architecture cannot honour (none is silently ignored)."""
    if m.arch == "transformer" and m.d_model % m.n_heads:
        raise SpecError("model.n_heads", f"must divide model.d_model ({m.d_model})")
    if m.arch == "rnn" and m.activation not in ("tanh", "relu"):
        raise SpecError("model.activation", "a vanilla rnn supports tanh or relu")
    if m.arch in ("gru", "lstm") and m.activation != "tanh":
        raise SpecError("model.activation", f"{m.arch} cells have fixed tanh/sigmoid nonlinearities; use tanh")
    if m.arch != "mlp" and m.norm == "batchnorm":
        raise SpecError("model.norm", "batchnorm is only supported for mlp; use layernorm or rmsnorm")
    if m.tie_embeddings and m.arch != "transformer" and m.hidden != m.d_model:
        raise SpecError(
            "model.tie_embeddings",
            f"needs model.hidden ({m.hidden}) to equal model.d_model ({m.d_model}) for {m.arch}",
        )
    if m.depth_scaled_init and m.arch in RECURRENT_ARCHS:
        raise SpecError("model.depth_scaled_init", "applies to transformer and mlp residual branches only")
    if m.depth_scaled_init and not m.residual:
        raise SpecError("model.depth_scaled_init", "scales residual branches; needs model.residual true")
