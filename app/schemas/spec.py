"""Job spec schema, generated from the engine's own spec (worker/engine/config.py).

One validator: field names, types, defaults, choices and numeric bounds come from the engine's
dataclasses and `RULES` (so the OpenAPI document states every bound the server enforces), and a
loaded spec is then passed through the engine's `parse_spec`, whose cross-field refusals
(`SpecError(path, message)`) come back as 422s naming the same field. worker.engine.config is
pure standard library: importing it here does not import torch.

Every schema raises on unknown keys; errors come back with dotted paths (`model.n_layers`).
The loaded spec is the engine's resolved spec: every default filled in, null `model.residual` and
`model.hidden` replaced by the architecture's choice.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from marshmallow import RAISE, Schema, ValidationError, fields, post_load, pre_load
from marshmallow.validate import Length, OneOf, Range, Regexp

from app.schemas.fields import INT64_MAX, StrictBoolean, StrictFloat, StrictInteger
from worker.engine import config as engine


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


def _range(path: str) -> Range | None:
    bound = engine.RULES.get(path)
    if bound is None:
        return None
    return Range(min=bound.lo, max=bound.hi, min_inclusive=not bound.lo_open, max_inclusive=not bound.hi_open)


def _range_doc(path: str) -> dict[str, Any]:
    """OpenAPI 3.0 exclusiveMinimum/exclusiveMaximum flags (apispec documents only the Range's ends)."""
    bound = engine.RULES.get(path)
    if bound is None:
        return {}
    return {k: True for k, is_open in (("exclusiveMinimum", bound.lo_open), ("exclusiveMaximum", bound.hi_open))
            if is_open}


def _number_doc(path: str) -> dict[str, Any]:
    """A number's full OpenAPI description, for the items of a tuple (apispec has no Tuple support)."""
    bound = engine.RULES[path]
    ends = {k: v for k, v in (("minimum", bound.lo), ("maximum", bound.hi)) if v is not None}
    return {"type": "number", **ends, **_range_doc(path)}


def _field(hint: Any, path: str, **kwargs: Any) -> fields.Field:
    """The marshmallow field for one engine field's type hint (bounds from engine.RULES[path])."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return _field(inner, path, **{"allow_none": type(None) in args, **kwargs})
    if dataclasses.is_dataclass(hint):
        return fields.Nested(schema_for(hint, path), **kwargs)
    if origin is Literal:
        return fields.String(validate=OneOf(args), **kwargs)
    if origin is tuple:
        doc = {"type": "array", "minItems": len(args), "maxItems": len(args), "items": _number_doc(path)}
        return fields.Tuple(tuple(_field(a, path) for a in args), metadata=doc, **kwargs)
    validate = _range(path)
    kwargs["metadata"] = {**_range_doc(path), **kwargs.get("metadata", {})}
    if hint is bool:
        return StrictBoolean(**kwargs)
    if hint is int:
        # Without an upper bound of its own, an integer still stops where the server's integers do.
        capped = validate if validate is not None and validate.max is not None else Range(
            min=validate.min if validate else None, max=INT64_MAX,
            min_inclusive=validate.min_inclusive if validate else True)
        return StrictInteger(validate=capped, **kwargs)
    if hint is float:
        return StrictFloat(validate=validate, allow_inf=path in engine.INFINITE_OK, **kwargs)
    return fields.String(**kwargs)


DATASET_ID_PATTERN = r"^ds_[0-9a-f]{24}$"
# Where the API is stricter than the engine (a submitted job must name its dataset; the CLI may not),
# and what the types alone do not say.
_API_FIELDS: dict[str, dict[str, Any]] = {
    "dataset_id": {"required": True, "allow_none": False,
                   "validate": Regexp(DATASET_ID_PATTERN, error="is not a dataset id this server made (ds_ and 24 hex digits)")},
    "name": {"validate": Length(min=1, max=engine.NAME_MAX_CHARS)},
    "model.hidden": {"metadata": {"description": "null: 4 * d_model for transformer (the FFN width), 128 otherwise"}},
    "model.residual": {"metadata": {"description": "null: true for transformer, false otherwise"}},
    "resources.devices": {"metadata": {"description": (
        "devices of one worker that train the job together (data parallel: DDP over NCCL on GPUs, gloo "
        "processes on CPU); training.batch_size stays the global batch and must be divisible by it; "
        "at most STABLETRAIN_MAX_DEVICES on this server")}},
}


def schema_for(cls: type, prefix: str = "") -> type[StrictSchema]:
    """A StrictSchema class mirroring the engine dataclass `cls` (named like it: ModelConfig -> ModelSchema)."""
    hints = typing.get_type_hints(cls)
    attrs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        kwargs = {"load_default": f.default, **_API_FIELDS.get(path, {})}
        if kwargs.get("required"):
            del kwargs["load_default"]
        if f.default_factory is not dataclasses.MISSING:  # a nested section: filled by _fill_sections
            kwargs = {}
        attrs[f.name] = _field(hints[f.name], path, **kwargs)
    name = cls.__name__.removesuffix("Config") + "Schema"
    return type(name, (StrictSchema,), attrs)


class JobSpecSchema(schema_for(engine.JobSpec)):  # type: ignore[misc]
    """The job spec of ARCHITECTURE.md; stored with every default filled in (the engine's resolution)."""

    @post_load
    def _engine_spec(self, data: dict[str, Any], **_kwargs: Any) -> dict[str, Any]:
        try:
            return engine.spec_to_dict(engine.parse_spec(spec_to_json(data)))
        except engine.SpecError as error:
            raise ValidationError(error.message, field_name=error.path or "_schema") from None


def spec_to_json(spec: Any) -> Any:
    """JSON-ready copy of a loaded spec (tuples become lists)."""
    if isinstance(spec, dict):
        return {k: spec_to_json(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [spec_to_json(v) for v in spec]
    return spec
