"""PNG plots of a 100k-step job aggregate in SQL: the request's peak Python allocation stays small, and a
single-step spike is still drawn (it is its bucket's max).

Bound: 10 MB of peak traced allocation per request (measured 1.3-3.8 MB). The aggregated data is at most ~1,000 buckets x 5 lines
x 4 numbers (well under 2 MB as Python objects) and matplotlib's figure for it (a 960x420 RGBA canvas is
1.6 MB, plus paths, text and the PNG encoder; heatmaps are drawn with pcolormesh, whose memory follows the
cells, not imshow, which resamples to float RGBA arrays of the axes' pixels, 10-20 MB) measures a few MB;
reading the series whole, as before, made a dict per row: about 100 MB for the 100k step rows alone. First
imports and font caches are paid on a small job before tracing, so the bound measures the request.

The rows are made by the database (INSERT ... SELECT over a recursive CTE of step numbers), not sent
one by one (170k rows).
"""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import case, insert, literal, select

from app.extensions import db
from app.models import ActivationMetric, Job, LayerMetric, StepMetric
from app.plots import service as plots_service
from app.plots.render import PLOT_NAMES
from tests.conftest import create_key
from tests.ui import seed

N_STEPS = 100_000
SPIKE_STEP, NAN_STEP, STATS_EVERY = 54_321, 77_777, 10
PEAK_BOUND = 10 * 2**20  # measured: 1.3-3.8 MB per plot; reading the whole series was ~100 MB
LAYERS = ["embed.weight", "layers.0.rnn.weight_hh_l0", "layers.1.rnn.weight_hh_l0", "head.weight"]
SITES = [("layers.0.rnn", "recurrent"), ("layers.1.rnn", "recurrent"), ("head", "output")]


def _numbers(last: int) -> Any:
    """Integers 1..last as a recursive CTE: the database makes the rows (one INSERT ... SELECT per table)."""
    n = select(literal(1).label("s")).cte("n", recursive=True)
    return n.union_all(select(n.c.s + 1).where(n.c.s < last))


def _fill(job_id: str) -> None:
    n = _numbers(N_STEPS)
    s = n.c.s
    spike, nan = s == SPIKE_STEP, s == NAN_STEP
    steps = select(literal(job_id), s, case((spike, 50.0), (nan, math.nan), else_=3.0 - s * 1e-5 + 0.01 * (s % 7)),
                   literal(1e-3), case((spike, 1e6), (nan, math.inf), else_=1.0 + 0.01 * (s % 5)), literal(1.0),
                   literal(False), nan, nan, case((s % 1000 == 0, 2.9), else_=None))
    db.session.execute(insert(StepMetric).from_select(
        ["job_id", "step", "loss", "lr", "grad_norm", "grad_norm_clipped", "clipped", "nonfinite", "skipped",
         "val_loss"], steps))
    every = s * STATS_EVERY
    in_range = every <= N_STEPS
    for i, name in enumerate(LAYERS):
        grad = case((every == SPIKE_STEP - 1, 1e6), else_=10.0 ** (i - 4)) if i == 3 else literal(10.0 ** (i - 4))
        db.session.execute(insert(LayerMetric).from_select(
            ["job_id", "step", "layer", "position", "grad_norm"],
            select(literal(job_id), every, literal(name), literal(i), grad).where(in_range)))
    for i, (site, kind) in enumerate(SITES):
        rnn = kind == "recurrent"
        saturated = case((every == 50_000, 0.9), else_=0.1) if rnn else literal(None)
        db.session.execute(insert(ActivationMetric).from_select(
            ["job_id", "step", "site", "position", "kind", "saturated_frac", "grad_time_ratio"],
            select(literal(job_id), every, literal(site), literal(i), literal(kind), saturated,
                   literal(1e-3 if rnn else None)).where(in_range)))


@pytest.fixture
def big_job(app: Flask, runner: FlaskCliRunner) -> tuple[str, dict[str, str], str]:
    owner, secret = create_key(runner, "memory")
    with app.app_context():
        small = seed.make_job(owner, name="warm-up")
        job = Job(owner_id=owner, dataset_id=None, name="long", spec=seed.SPEC, status="succeeded", max_steps=N_STEPS)
        db.session.add(job)
        db.session.commit()
        _fill(job.id)
        db.session.commit()
        return job.id, {"Authorization": f"Bearer {secret}"}, small


def _peak_of(client: FlaskClient, url: str, auth: dict[str, str]) -> tuple[int, bytes]:
    tracemalloc.start()
    try:
        response = client.get(url, headers=auth)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200 and response.data.startswith(b"\x89PNG")
    return peak, response.data


def test_plots_of_a_100k_step_job_stay_small_and_keep_spikes(app: Flask, client: FlaskClient, big_job: Any,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    job_id, auth, small = big_job
    for name in PLOT_NAMES:  # first imports and font caches are paid here, outside the measurement
        assert client.get(f"/v1/jobs/{small}/plots/{name}.png", headers=auth).status_code == 200
    peaks = {}
    for name in PLOT_NAMES:
        peaks[name], _png = _peak_of(client, f"/v1/jobs/{job_id}/plots/{name}.png", auth)
    with capsys.disabled():
        print("\npeak traced allocation per plot request (MB): "
              + ", ".join(f"{n} {p / 2**20:.1f}" for n, p in peaks.items()))
    assert all(p < PEAK_BOUND for p in peaks.values()), peaks

    with app.app_context():
        job = db.session.get(Job, job_id)
        steps = plots_service.load(job, "loss").steps
        layers = plots_service.load(job, "layers").heatmap
        activations = plots_service.load(job, "activations").heatmap
    loss, grad = steps.lines["loss"], steps.lines["grad_norm"]
    assert len(loss.x) == 1000 and steps.bucket_size == 100
    spike = next(i for i, x in enumerate(loss.x) if x >= SPIKE_STEP)
    assert loss.hi[spike] == 50.0 and grad.hi[spike] == 1e6  # one step in a bucket of 100, still the max
    assert max(v for v in loss.hi if v is not None) == 50.0
    assert loss.lo[spike] < 3.0 and loss.last[spike] < 3.0
    assert steps.bad_count == 1 and steps.bad_steps == [NAN_STEP]
    nan_bucket = next(i for i, x in enumerate(loss.x) if x >= NAN_STEP)
    assert loss.hi[nan_bucket] is not None and loss.hi[nan_bucket] < 3.0  # NaN/inf never reach an aggregate
    assert len(layers.col_steps) <= 800 and layers.names == LAYERS
    assert max(v for v in layers.values[3] if v is not None) == 6.0  # log10 of the one exploding layer row
    assert max(v for v in activations.values[0] if v is not None) == 0.9
    assert len(steps.lines["val_loss"].points("hi")) == N_STEPS // 1000
