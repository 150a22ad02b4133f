"""Probe and dry-run schemas."""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validates_schema
from marshmallow.validate import Range

from app.schemas.common import QuerySchema
from app.schemas.fields import StrictFloat, StrictInteger

LR_LIMIT = 100.0  # training.lr's own upper bound


class ProbeRequestSchema(Schema):
    class Meta:
        unknown = RAISE

    lr_min = StrictFloat(load_default=1e-7, validate=Range(0, LR_LIMIT, min_inclusive=False), metadata={
        "description": "First learning rate of the sweep"})
    lr_max = StrictFloat(load_default=10.0, validate=Range(0, LR_LIMIT, min_inclusive=False), metadata={
        "description": "Last learning rate (reached only when the loss has not diverged before); above lr_min"})
    steps = StrictInteger(load_default=200, validate=Range(10, 1000), metadata={
        "description": "Optimizer steps of the sweep at most (it stops early at divergence)"})

    @validates_schema
    def _increasing(self, data: dict[str, Any], **_: Any) -> None:
        if data["lr_min"] >= data["lr_max"]:
            raise ValidationError("must be greater than lr_min", "lr_max")


class CurvePointSchema(Schema):
    lr = fields.Float()
    loss = fields.Float(allow_none=True, metadata={"description": "The step's loss (null when non-finite)"})
    smoothed = fields.Float(allow_none=True, metadata={"description": "EMA of the loss with bias correction"})


class LrPatchSchema(Schema):
    field = fields.String(metadata={"description": "Always training.lr"})
    value = fields.Float()


class ProbeResultSchema(Schema):
    lr_min = fields.Float()
    lr_max = fields.Float()
    steps_run = fields.Integer()
    curve = fields.List(fields.Nested(CurvePointSchema))
    steepest_lr = fields.Float(allow_none=True, metadata={
        "description": "Where the smoothed loss falls fastest against log lr"})
    divergence_lr = fields.Float(allow_none=True, metadata={
        "description": "Where the smoothed loss passed 4x its best or went non-finite (null: never within lr_max)"})
    min_loss_lr = fields.Float(allow_none=True)
    min_smoothed_loss = fields.Float(allow_none=True)
    recommended = fields.Nested(LrPatchSchema, allow_none=True, metadata={
        "description": "steepest_lr capped at divergence_lr / 10: pass as POST .../retry overrides {field: value}"})


class ProbeSchema(Schema):
    id = fields.String()
    job_id = fields.String()
    params = fields.Dict()
    status = fields.String(metadata={"description": "queued, running, succeeded or failed"})
    result = fields.Nested(ProbeResultSchema, allow_none=True)
    error = fields.String(allow_none=True)
    created_at = fields.DateTime()
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)


class DryRunQuerySchema(QuerySchema):
    dry_run = fields.Boolean(load_default=False, metadata={
        "description": "true: validate and estimate the spec (200 with a DryRun body); no job is made"})


class MemorySchema(Schema):
    params_bytes = fields.Integer(metadata={"description": "fp32 weights (4 bytes each)"})
    grads_bytes = fields.Integer(metadata={"description": "fp32 gradients"})
    optimizer_bytes = fields.Integer(metadata={"description": "optimizer state: Adam/AdamW 2, SGD momentum 1, "
                                                              "plain SGD 0 fp32 tensors per parameter"})
    activations_bytes = fields.Integer(metadata={
        "description": "tensors kept for backward of one micro-batch (half precision under bf16/fp16), "
                       "plus fp32 logits and their gradient"})
    optimizer_states_per_param = fields.Integer()
    total_bytes = fields.Integer()


class DryRunSchema(Schema):
    params = fields.Integer(metadata={"description": "Exact parameter count at vocab_size"})
    flop_params = fields.Integer(metadata={"description": "N of the FLOP count (see docs: per arch)"})
    vocab_size = fields.Integer()
    vocab_exact = fields.Boolean(metadata={"description": "false for bpe (vocab_size is its upper bound)"})
    memory = fields.Nested(MemorySchema)
    tokens = fields.Integer(metadata={"description": "max_steps * batch_size * grad_accum_steps * seq_len"})
    tokens_per_step = fields.Integer()
    eval_tokens = fields.Integer()
    flops = fields.Integer(metadata={"description": "train_flops + eval_flops"})
    train_flops = fields.Integer(metadata={"description": "6 * flop_params * tokens"})
    eval_flops = fields.Integer(metadata={"description": "2 * flop_params * eval_tokens"})
    estimated_wall_s = fields.Float(allow_none=True, metadata={
        "description": "flops / the calibrated device's FLOPs/s; null with wall_reason when none is cached"})
    device_class = fields.String(allow_none=True)
    flops_per_s = fields.Float(allow_none=True)
    calibrated_at = fields.DateTime(allow_none=True)
    wall_reason = fields.String(allow_none=True)
