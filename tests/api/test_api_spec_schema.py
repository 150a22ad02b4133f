"""The API validates job specs with the engine's own rules: generated schema + parse_spec."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient
from marshmallow import Schema, fields

from app.schemas.fields import INT64_MAX
from app.schemas.spec import JobSpecSchema, spec_to_json
from tests.engine.refused_specs import refused_cases
from worker.engine import config

ROOT = Path(__file__).resolve().parents[2]


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
    assert _schema_tree(JobSpecSchema()) == _dataclass_tree(config.JobSpec)


def test_same_defaults_as_engine() -> None:
    loaded = JobSpecSchema().load({"dataset_id": "ds_0123456789abcdef01234567"})
    engine = config.spec_to_dict(config.parse_spec({"dataset_id": "ds_0123456789abcdef01234567"}))
    assert spec_to_json(loaded) == engine


def test_loaded_spec_is_the_engines_resolution() -> None:
    loaded = JobSpecSchema().load({"dataset_id": "ds_0123456789abcdef01234567", "model": {"arch": "transformer", "d_model": 48}})
    assert loaded["model"]["hidden"] == 192 and loaded["model"]["residual"] is True
    loaded = JobSpecSchema().load({"dataset_id": "ds_0123456789abcdef01234567", "model": {"arch": "gru", "hidden": None}})
    assert loaded["model"]["hidden"] == 128 and loaded["model"]["residual"] is False


def test_every_engine_refusal_is_a_422_on_the_same_field(client: FlaskClient, auth: dict[str, str],
                                                         dataset: dict[str, Any]) -> None:
    mismatches = []
    cases = refused_cases()
    assert set(config.RULES) <= {path.removesuffix(".0") for _, path in cases}  # every rule is exercised
    for fragment, path in cases:
        body = {"dataset_id": dataset["id"], "name": "t", **fragment}
        response = client.post("/v1/jobs", json=body, headers=auth)
        details = (response.json or {}).get("error", {}).get("details", {})
        if response.status_code != 422 or list(details) != [path]:
            mismatches.append((fragment, path, response.status_code, details))
    assert not mismatches, mismatches
    assert client.get("/v1/jobs", headers=auth).json["items"] == []  # nothing was stored


def test_refusal_message_is_the_engines(client: FlaskClient, auth: dict[str, str], dataset: dict[str, Any]) -> None:
    body = {"dataset_id": dataset["id"], "model": {"arch": "lstm", "activation": "relu"}}
    response = client.post("/v1/jobs", json=body, headers=auth)
    assert response.status_code == 422
    assert response.json["error"]["details"] == {
        "model.activation": ["lstm cells have fixed tanh/sigmoid nonlinearities; use tanh"]}


def _property(doc: dict[str, Any], path: str) -> dict[str, Any]:
    """The OpenAPI property of a dotted spec path, following $refs from JobSpec."""
    schemas = doc["components"]["schemas"]
    node = schemas["JobSpec"]
    for part in path.split("."):
        node = node["properties"][part]
        if "$ref" in node:
            node = schemas[node["$ref"].rsplit("/", 1)[1]]
    return node


def test_openapi_states_every_bound_the_server_enforces(client: FlaskClient) -> None:
    doc = client.get("/v1/openapi.json").json
    for path, bound in config.RULES.items():
        prop = _property(doc, path)
        if prop.get("type") == "array":
            prop = prop["items"]
        # an integer with no upper bound of its own stops where the server's integers do
        hi = INT64_MAX if bound.hi is None and prop["type"] == "integer" else bound.hi
        assert prop.get("minimum") == bound.lo and prop.get("maximum") == hi, path
        assert prop.get("exclusiveMinimum", False) == bound.lo_open, path
        assert prop.get("exclusiveMaximum", False) == bound.hi_open, path
    assert _property(doc, "stabilization.weight_max_norm")["exclusiveMinimum"] is True
    assert _property(doc, "dataset_id")["pattern"] == "^ds_[0-9a-f]{24}$"
    assert _property(doc, "model.activation")["enum"] == [*config.ACTIVATIONS, None]  # null: per arch
    hidden = _property(doc, "model.hidden")
    assert hidden["nullable"] is True and hidden["default"] is None
    assert _property(doc, "model.depth_scaled_init") == {"type": "boolean", "default": False}


def test_api_never_imports_torch() -> None:
    script = (
        "import importlib, pkgutil, sys\n"
        "import app\n"
        "for m in pkgutil.walk_packages(app.__path__, 'app.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert 'worker.engine.config' in sys.modules\n"
        "sys.exit('torch imported' if 'torch' in sys.modules else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
