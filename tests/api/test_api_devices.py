"""resources.devices at the API: the spec's bounds, the server's STABLETRAIN_MAX_DEVICES, batch divisibility."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient


def _refused(response: Any, path: str) -> str:
    assert response.status_code == 422, response.json
    assert path in response.json["error"]["details"], response.json
    error = response.json["error"]
    return " ".join([error["message"], *error["details"][path]])


def test_one_device_by_default_and_more_refused_by_a_one_device_server(
        submit: Any, auth: dict[str, str], dataset: dict[str, Any]) -> None:
    accepted = submit(auth, dataset["id"])
    assert accepted.status_code == 202 and accepted.json["spec"]["resources"] == {"devices": 1}
    message = _refused(submit(auth, dataset["id"], resources={"devices": 2}), "resources.devices")
    assert "at most 1 on this server" in message


def test_a_server_with_more_devices_takes_them_whole_batches_only(
        app: Flask, submit: Any, auth: dict[str, str], dataset: dict[str, Any], monkeypatch: Any) -> None:
    monkeypatch.setitem(app.config, "MAX_DEVICES", 4)
    two = submit(auth, dataset["id"], resources={"devices": 2},
                 training={"max_steps": 10, "seq_len": 16, "batch_size": 8})
    assert two.status_code == 202 and two.json["spec"]["resources"] == {"devices": 2}
    assert two.json["spec"]["training"]["batch_size"] == 8  # still the global batch
    uneven = submit(auth, dataset["id"], resources={"devices": 3},
                    training={"max_steps": 10, "seq_len": 16, "batch_size": 8})
    assert "divisible by resources.devices (3)" in _refused(uneven, "training.batch_size")
    assert "at most 4 on this server" in _refused(submit(auth, dataset["id"], resources={"devices": 8}),
                                                  "resources.devices")


@pytest.mark.parametrize("devices", [0, 65, 1.5, "2"])
def test_devices_outside_the_spec_range_or_type(submit: Any, auth: dict[str, str], dataset: dict[str, Any],
                                                devices: Any) -> None:
    _refused(submit(auth, dataset["id"], resources={"devices": devices}), "resources.devices")


def test_openapi_states_the_devices_bounds(client: FlaskClient) -> None:
    schemas = client.get("/v1/openapi.json").json["components"]["schemas"]
    devices = schemas["Resources"]["properties"]["devices"]
    assert (devices["minimum"], devices["maximum"], devices["default"]) == (1, 64, 1)
    assert "STABLETRAIN_MAX_DEVICES" in devices["description"]
