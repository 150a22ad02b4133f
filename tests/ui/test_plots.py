"""GET /v1/jobs/{id}/plots/{name}.png: PNG bytes, size, owner check, unknown names, caching."""

from __future__ import annotations

import io
import struct
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner

from app.extensions import db
from app.plots import aggregate
from app.plots import service as plots_service
from app.plots.order import depth_order, layer_order
from app.plots.render import HEIGHT_PX, PLOT_NAMES, WIDTH_PX
from tests.conftest import create_key
from tests.ui import seed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(body: bytes) -> tuple[int, int]:
    """(width, height) from the IHDR chunk (PIL, when installed, agrees: checked below)."""
    assert body[:8] == PNG_MAGIC
    assert body[12:16] == b"IHDR"
    return struct.unpack(">II", body[16:24])


@pytest.fixture
def owner(runner: FlaskCliRunner) -> tuple[str, dict[str, str]]:
    key_id, secret = create_key(runner, "plots")
    return key_id, {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def job_id(app: Flask, owner: tuple[str, dict[str, str]]) -> str:
    with app.app_context():
        return seed.make_job(owner[0])


@pytest.mark.parametrize("name", PLOT_NAMES)
def test_plot_is_a_png_of_the_documented_size(client: FlaskClient, owner: Any, job_id: str, name: str) -> None:
    response = client.get(f"/v1/jobs/{job_id}/plots/{name}.png", headers=owner[1])
    assert response.status_code == 200, response.data[:300]
    assert response.mimetype == "image/png"
    body = response.data
    assert body.startswith(PNG_MAGIC)
    assert png_size(body) == (WIDTH_PX, HEIGHT_PX)
    image_module = pytest.importorskip("PIL.Image")
    with image_module.open(io.BytesIO(body)) as image:
        assert image.size == (WIDTH_PX, HEIGHT_PX)
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is not None and len(colours) > 20  # lines and labels were drawn, not a blank figure


def test_plot_of_another_key_and_unknown_names_are_404(client: FlaskClient, runner: FlaskCliRunner,
                                                       owner: Any, job_id: str) -> None:
    _, other = create_key(runner, "other")
    response = client.get(f"/v1/jobs/{job_id}/plots/loss.png", headers={"Authorization": f"Bearer {other}"})
    assert response.status_code == 404
    assert response.json["error"]["code"] == "not_found"
    response = client.get(f"/v1/jobs/{job_id}/plots/histogram.png", headers=owner[1])
    assert response.status_code == 404
    assert response.json["error"]["code"] == "not_found"
    assert client.get(f"/v1/jobs/{job_id}/plots/loss.png").status_code == 401
    assert client.get("/v1/jobs/job_000000000000000000000000/plots/loss.png", headers=owner[1]).status_code == 404


def test_cache_hit_returns_the_same_bytes_and_new_steps_render_again(
        app: Flask, client: FlaskClient, owner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with app.app_context():
        job_id = seed.make_job(owner[0], status="running", steps=40)
    calls: list[str] = []
    real_render = plots_service.render
    monkeypatch.setattr(plots_service, "render", lambda name, data: calls.append(name) or real_render(name, data))
    url = f"/v1/jobs/{job_id}/plots/grad_norm.png"
    first = client.get(url, headers=owner[1])
    second = client.get(url, headers=owner[1])
    assert first.status_code == second.status_code == 200
    assert first.data == second.data
    assert calls == ["grad_norm"]
    # a new API process (empty memory) finds the render in the storage dir
    plots_service.clear_memory_cache()
    assert client.get(url, headers=owner[1]).data == first.data
    assert calls == ["grad_norm"]
    # conditional GET
    etag = first.headers["ETag"]
    assert client.get(url, headers={**owner[1], "If-None-Match": etag}).status_code == 304
    # new steps: a new render, a new ETag; the old file is removed
    with app.app_context():
        seed.add_steps(job_id, 41, 60)
        storage = plots_service.storage_dir()
    third = client.get(url, headers=owner[1])
    assert third.status_code == 200 and third.headers["ETag"] != etag
    assert calls == ["grad_norm", "grad_norm"]
    assert sorted(p.name for p in (storage / "plots" / job_id).iterdir()) == ["grad_norm-60.png"]


def test_plot_of_a_job_without_metrics_says_so(app: Flask, client: FlaskClient, owner: Any) -> None:
    with app.app_context():
        job_id = seed.make_job(owner[0], status="queued", steps=0)
    for name in PLOT_NAMES:
        response = client.get(f"/v1/jobs/{job_id}/plots/{name}.png", headers=owner[1])
        assert response.status_code == 200 and response.data.startswith(PNG_MAGIC)


def test_layer_heatmap_depth_order_log_scale_and_nonfinite_cells(app: Flask, job_id: str) -> None:
    with app.app_context():
        heat = plots_service.load(db.session.get(seed.Job, job_id), "layers").heatmap
        merged = aggregate.layer_heatmap(job_id, max_columns=5)
    names, steps, values, bad = heat.names, heat.col_steps, heat.values, heat.bad
    assert names == seed.LAYERS
    assert steps == list(range(10, 201, 10))
    assert values[0][0] is not None and values[0][0] < -6  # vanishing first layer
    spike = steps.index(seed.SPIKE_STEP)
    assert values[-1][spike] > values[-1][spike - 1] + 1.5  # the exploding step stands out
    assert bad[-1][steps.index(seed.NAN_STEP)] and not bad[0][steps.index(seed.NAN_STEP)]
    assert len(merged.col_steps) == 5 and any(merged.bad[-1])  # merging keeps the non-finite mark
    assert max(v for v in merged.values[-1] if v is not None) == max(v for v in values[-1] if v is not None)


def test_activation_heatmap_and_grad_time_lines(app: Flask, owner: Any, job_id: str) -> None:
    with app.app_context():
        job = db.session.get(seed.Job, job_id)
        heat = plots_service.load(job, "activations")
        lines = plots_service.load(job, "grad_time").lines
        relu_id = seed.make_job(owner[0], name="tf", sites=seed.TRANSFORMER_SITES)
        relu = plots_service.load(db.session.get(seed.Job, relu_id), "activations")
        none = plots_service.load(db.session.get(seed.Job, relu_id), "grad_time").lines
    assert heat.heatmap_metric == "saturated_frac"
    assert heat.heatmap.names == ["layers.0.rnn", "layers.1.rnn"]  # sites reporting saturation, depth order
    assert heat.heatmap.col_steps == list(range(10, 201, 10))
    assert heat.heatmap.values[0][-1] == pytest.approx(min(1.0, 0.1 + 200 / 250 + 0.2))
    assert list(lines) == ["layers.0.rnn", "layers.1.rnn"]
    assert lines["layers.0.rnn"].x == list(range(10, 201, 10))
    assert lines["layers.0.rnn"].lo[-1] == pytest.approx(10.0 ** (-1 - 200 / 40))
    assert relu.heatmap_metric == "dead_frac" and relu.heatmap.names == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    assert none == {}


def test_depth_order_of_engine_layer_names() -> None:
    transformer = (["tok_emb.weight", "pos_emb.weight"]
                   + [f"blocks.{i}.{p}.weight" for i in range(12) for p in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
                   + ["head.weight"])
    assert depth_order(sorted(transformer)) == transformer
    assert depth_order(sorted(seed.LAYERS)) == seed.LAYERS


# a model whose names the heuristic cannot order: it would put "body" first and "stem" last
CUSTOM = ["stem.weight", "body.0.weight", "body.1.weight", "readout.weight"]


def test_layer_order_uses_positions_and_falls_back_to_names() -> None:
    assert depth_order(CUSTOM) != CUSTOM
    rows = [{"layer": n, "position": i} for i, n in reversed(list(enumerate(CUSTOM)))]
    assert layer_order(rows) == CUSTOM
    # old rows (no position) of the same layers next to new ones: the recorded positions win
    assert layer_order([{"layer": n, "position": None} for n in CUSTOM] + rows) == CUSTOM
    # a job recorded before positions existed: the name heuristic, for every layer
    old = [{"layer": n} for n in sorted(seed.LAYERS)] + [{"layer": "head.weight", "position": None}]
    assert layer_order(old) == seed.LAYERS
    # a layer without any position: the heuristic for all, never a mix of the two orders
    assert layer_order(rows[1:] + [{"layer": CUSTOM[-1], "position": None}]) == depth_order(CUSTOM)
    assert layer_order([]) == []


@pytest.mark.parametrize("positions", [True, False])
def test_heatmap_rows_follow_recorded_positions(app: Flask, owner: Any, positions: bool) -> None:
    with app.app_context():
        job_id = seed.make_job(owner[0], layer_names=CUSTOM, positions=positions)
        names = plots_service.load(db.session.get(seed.Job, job_id), "layers").heatmap.names
    assert names == (CUSTOM if positions else depth_order(CUSTOM))


def test_plots_are_in_the_openapi_document(client: FlaskClient) -> None:
    doc = client.get("/v1/openapi.json").json
    for name in PLOT_NAMES:
        op = doc["paths"][f"/v1/jobs/{{job_id}}/plots/{name}.png"]["get"]
        assert op["responses"]["200"]["content"]["image/png"]["schema"]["format"] == "binary"
        assert "404" in op["responses"] and op["summary"].startswith(f"{name}.png")


def test_the_api_process_does_not_import_torch(client: FlaskClient, owner: Any, job_id: str) -> None:
    import subprocess
    import sys

    code = ("import sys; from app import create_app; import app.plots.render as r; r._mpl(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
