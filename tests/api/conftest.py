"""Fixtures for API tests: datasets and jobs made through the HTTP API."""

from __future__ import annotations

from typing import Any

import pytest
from flask.testing import FlaskClient

CORPUS = ("the quick brown fox jumps over the lazy dog. " * 500).strip()


@pytest.fixture
def upload(client: FlaskClient) -> Any:
    """Factory: upload text as text/plain; returns the response."""

    def do(headers: dict[str, str], text: str | bytes = CORPUS, name: str | None = "corpus") -> Any:
        url = "/v1/datasets" + (f"?name={name}" if name else "")
        return client.post(url, data=text, headers={**headers, "Content-Type": "text/plain"})

    return do


@pytest.fixture
def dataset(upload: Any, auth: dict[str, str]) -> dict[str, Any]:
    """A ~22 kB dataset owned by `auth`."""
    response = upload(auth)
    assert response.status_code == 201, response.json
    return response.json


@pytest.fixture
def submit(client: FlaskClient) -> Any:
    """Factory: POST /v1/jobs with a small default spec merged with overrides."""

    def do(headers: dict[str, str], dataset_id: str, extra_headers: dict[str, str] | None = None,
           **sections: Any) -> Any:
        body = {"dataset_id": dataset_id, "name": "t", "training": {"max_steps": 10, "seq_len": 16}}
        body.update(sections)
        return client.post("/v1/jobs", json=body, headers={**headers, **(extra_headers or {})})

    return do


@pytest.fixture
def job(submit: Any, auth: dict[str, str], dataset: dict[str, Any]) -> dict[str, Any]:
    """A queued job owned by `auth`."""
    response = submit(auth, dataset["id"])
    assert response.status_code == 202, response.json
    return response.json
