"""Job spec schemas: field names, defaults and ranges mirror worker/engine/config.py exactly.

Every schema raises on unknown keys; errors come back with dotted paths (`model.n_layers`).
"""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, pre_load, validates_schema
from marshmallow.validate import Length, OneOf, Range

from app.schemas.fields import StrictBoolean, StrictFloat, StrictInteger

ARCHS = ("mlp", "rnn", "gru", "lstm", "transformer")
ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "gelu", "silu", "elu")
NORMS = ("none", "batchnorm", "layernorm", "rmsnorm")
INITS = ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal", "normal")


def _int(default: int, lo: int | None = None, hi: int | None = None) -> StrictInteger:
    return StrictInteger(load_default=default, validate=Range(min=lo, max=hi))


def _float(default: float | None, lo: float | None = None, hi: float | None = None,
           min_inclusive: bool = True, max_inclusive: bool = True, **kwargs: Any) -> StrictFloat:
    rng = Range(min=lo, max=hi, min_inclusive=min_inclusive, max_inclusive=max_inclusive)
    return StrictFloat(load_default=default, validate=rng, **kwargs)


def _choice(default: str, choices: tuple[str, ...]) -> fields.String:
    return fields.String(load_default=default, validate=OneOf(choices))


class StrictSchema(Schema):
    """Unknown keys are errors; a missing or null nested section means all its defaults."""

    class Meta:
        unknown = RAISE

    @pre_load
    def _fill_sections(self, data: Any, **_kwargs: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, field in self.fields.items():
            if isinstance(field, fields.Nested) and data.get(name) is None:
                data[name] = {}
        return data


class ModelSchema(StrictSchema):
    arch = _choice("lstm", ARCHS)
    n_layers = _int(2, 1, 64)
    d_model = _int(64, 1, 4096)
    hidden = _int(128, 1, 8192)
    context = _int(8, 1, 512)
    n_heads = _int(4, 1)
    activation = _choice("tanh", ACTIVATIONS)
    norm = _choice("none", NORMS)
    norm_position = _choice("pre", ("pre", "post"))
    # null/absent: the architecture's usual choice (on for transformers, off otherwise), as the engine
    residual = StrictBoolean(load_default=None, allow_none=True)
    qk_norm = StrictBoolean(load_default=False)
    init = _choice("default", INITS)
    init_std = _float(0.02, 0, 10, min_inclusive=False)
    init_gain = _float(1.0, 0, 100, min_inclusive=False)
    recurrent_init = _choice("default", ("default", "orthogonal"))
    forget_bias = _float(0.0)
    dropout = _float(0.0, 0, 1, max_inclusive=False)
    tie_embeddings = StrictBoolean(load_default=False)

    @post_load
    def _resolve_residual(self, data: dict[str, Any], **_kwargs: Any) -> dict[str, Any]:
        if data.get("residual") is None:
            data["residual"] = data["arch"] == "transformer"
        return data

    @validates_schema
    def _consistent(self, data: dict[str, Any], **_kwargs: Any) -> None:
        if data["arch"] == "transformer" and data["d_model"] % data["n_heads"]:
            raise ValidationError(f"must divide model.d_model ({data['d_model']})", "n_heads")
        if data["arch"] == "rnn" and data["activation"] not in ("tanh", "relu"):
            raise ValidationError("a vanilla rnn supports tanh or relu", "activation")
        if data["arch"] != "mlp" and data["norm"] == "batchnorm":
            raise ValidationError("batchnorm is only supported for mlp; use layernorm or rmsnorm", "norm")


class TokenizerSchema(StrictSchema):
    kind = _choice("byte", ("byte", "char", "bpe"))
    vocab_size = _int(1024, 257, 65536)


class TrainingSchema(StrictSchema):
    max_steps = _int(200, 1, 10_000_000)
    batch_size = _int(16, 1, 4096)
    seq_len = _int(64, 2, 8192)
    grad_accum_steps = _int(1, 1, 1024)
    optimizer = _choice("adamw", ("sgd", "adam", "adamw"))
    lr = _float(1e-3, 0, 100, min_inclusive=False)
    momentum = _float(0.9, 0, 1, max_inclusive=False)
    betas = fields.Tuple(
        (_float(None, 0, 1, max_inclusive=False), _float(None, 0, 1, max_inclusive=False)),
        load_default=(0.9, 0.999),
    )
    weight_decay = _float(0.0, 0, 10)
    schedule = _choice("constant", ("constant", "linear", "cosine"))
    warmup_steps = _int(0, 0)
    min_lr_ratio = _float(0.1, 0, 1)
    eval_every = _int(50, 1)
    eval_batches = _int(4, 1, 1000)
    val_fraction = _float(0.1, 0, 0.5, min_inclusive=False, max_inclusive=False)
    seed = _int(0, 0, 2**63 - 1)

    @validates_schema
    def _consistent(self, data: dict[str, Any], **_kwargs: Any) -> None:
        if data["warmup_steps"] > data["max_steps"]:
            raise ValidationError("must not exceed training.max_steps", "warmup_steps")


class ClipSchema(StrictSchema):
    mode = _choice("norm", ("none", "norm", "value", "agc", "adaptive"))
    max_norm = _float(1.0, 0, min_inclusive=False)
    norm_type = _float(2.0, 0, min_inclusive=False, allow_inf=True)
    clip_value = _float(1.0, 0, min_inclusive=False)
    agc_factor = _float(0.01, 0, min_inclusive=False)
    agc_eps = _float(1e-3, 0, min_inclusive=False)
    adaptive_method = _choice("percentile", ("percentile", "zscore"))
    percentile = _float(90.0, 0, 100, min_inclusive=False)
    z_thresh = _float(2.5, 0, min_inclusive=False)
    ema_alpha = _float(0.97, 0, 1, min_inclusive=False, max_inclusive=False)
    adaptive_warmup = _int(25, 1)


class StabilizationSchema(StrictSchema):
    clip = fields.Nested(ClipSchema)
    precision = _choice("fp32", ("fp32", "bf16", "fp16"))
    nonfinite = _choice("skip", ("skip", "stop"))
    max_consecutive_skips = _int(10, 1)
    on_explosion = _choice("none", ("none", "skip", "rollback"))
    explosion_factor = _float(10.0, 1, min_inclusive=False)
    rollback_lr_factor = _float(0.5, 0, 1, min_inclusive=False, max_inclusive=False)
    max_rollbacks = _int(5, 0)
    weight_max_norm = _float(None, 0, min_inclusive=False, allow_none=True)


class MonitoringSchema(StrictSchema):
    layer_stats_every = _int(10, 1)
    activation_stats = StrictBoolean(load_default=True)
    attribution_top_k = _int(4, 0, 64)


class CheckpointingSchema(StrictSchema):
    every_steps = _int(100, 1)
    keep_last = _int(3, 1, 100)


class JobSpecSchema(StrictSchema):
    """The job spec of ARCHITECTURE.md; stored with every default filled in."""

    name = fields.String(load_default="run", validate=Length(min=1, max=200))
    dataset_id = fields.String(required=True)
    model = fields.Nested(ModelSchema)
    tokenizer = fields.Nested(TokenizerSchema)
    training = fields.Nested(TrainingSchema)
    stabilization = fields.Nested(StabilizationSchema)
    monitoring = fields.Nested(MonitoringSchema)
    checkpointing = fields.Nested(CheckpointingSchema)


def spec_to_json(spec: Any) -> Any:
    """JSON-ready copy of a loaded spec (tuples become lists)."""
    if isinstance(spec, dict):
        return {k: spec_to_json(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [spec_to_json(v) for v in spec]
    return spec
