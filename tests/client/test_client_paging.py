"""The client's listing helpers follow next_cursor and lose nothing, whatever the page size."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask

from stabletrain import Client
from tests.api import listing_seed as seed

MakeClient = Callable[..., Client]
SPEC = {"name": "paging", "training": {"max_steps": 10, "seq_len": 16}}


@pytest.mark.parametrize("limit", [1, 3, 4, 1000])
def test_listings_return_every_row_in_order(app: Flask, api_url: str, api_key: str, make_client: MakeClient,
                                            limit: int) -> None:
    client = make_client(api_url, api_key)
    dataset = client.upload_text("the quick brown fox jumps over the lazy dog. " * 100, name="d")
    job_id = client.submit(SPEC, dataset_id=dataset["id"])["id"]
    with app.app_context():
        seed.fill(job_id)
    assert [r["step"] for r in client.metrics(job_id, limit=limit)] == list(range(1, seed.N_STEPS + 1))
    layers = [(r["step"], r["layer"]) for r in client.layer_metrics(job_id, limit=limit)]
    assert len(layers) == len(seed.layer_rows(job_id)) and len(set(layers)) == len(layers)
    assert [s for s, _n in layers] == sorted(s for s, _n in layers)
    activations = [(r["step"], r["position"]) for r in client.activation_metrics(job_id, limit=limit)]
    assert activations == [(s, i) for s, i in sorted((r["step"], r["position"]) for r in seed.activation_rows(job_id))]
    events = [e["message"] for e in client.events(job_id, limit=limit)]
    assert events[-len(seed.EVENT_STEPS):] == [f"e{i}" for i in range(len(seed.EVENT_STEPS))]
    assert [r["step"] for r in client.metrics(job_id, after_step=9, limit=limit)] == [10, 11, 12]
    assert [r["step"] for r in client.layer_metrics(job_id, after_step=10, limit=limit)] == [11] * len(seed.LAYERS)
