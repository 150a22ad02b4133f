"""The API's marshmallow job spec mirrors worker/engine/config.py field for field."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from marshmallow import Schema, fields

from app.schemas.spec import JobSpecSchema, spec_to_json


def _schema_tree(schema: Schema) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, field in schema.fields.items():
        tree[name] = _schema_tree(field.schema) if isinstance(field, fields.Nested) else None
    return tree


def _dataclass_tree(cls: type) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else None
        tree[field.name] = _dataclass_tree(type(default)) if dataclasses.is_dataclass(default) else None
    return tree


def test_same_fields_as_engine() -> None:
    config = pytest.importorskip("worker.engine.config")
    assert _schema_tree(JobSpecSchema()) == _dataclass_tree(config.JobSpec)


def test_same_defaults_as_engine() -> None:
    config = pytest.importorskip("worker.engine.config")
    loaded = JobSpecSchema().load({"dataset_id": "ds_x"})
    engine = config.spec_to_dict(config.parse_spec({"dataset_id": "ds_x"}))
    assert spec_to_json(loaded) == engine
