"""The dashboard in a real browser: Debian's chromium driven by Playwright (system binary, never
`playwright install`), against the app served over HTTP on a free port with a temp database.

Skips when chromium or Playwright is missing; fails instead under CI=true. Screenshots go to
test-artifacts/ (gitignored).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from app import create_app
from app.extensions import db
from app.models import Event, Job, StepMetric
from app.plots.order import depth_order, layer_order
from tests.conftest import create_key
from tests.ui import seed
from tests.ui.browser import canvas_stats, points, require_browser, screenshot, serve, wait_until


@dataclass
class Served:
    app: Flask
    base_url: str
    owner_id: str
    secret: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The app under a real threaded HTTP server on a free port, on its own temp database and storage."""
    require_browser()
    root = tmp_path_factory.mktemp("ui-served")
    app = create_app({
        "DATABASE_URL": f"sqlite:///{root / 'ui.db'}",
        "BROKER_URL": f"sqlalchemy+sqlite:///{root / 'broker.db'}",
        "STORAGE_DIR": str(root / "storage"),
        "ENQUEUE_RETRIES": 0,
    })
    with app.app_context():
        db.create_all()
    owner_id, secret = create_key(app.test_cli_runner(), "browser")
    with serve(app) as base_url:
        yield Served(app, base_url, owner_id, secret)
    with app.app_context():
        db.engine.dispose()


def in_app(served: Served, fn: Callable[[], Any]) -> Any:
    with served.app.app_context():
        return fn()


def test_finished_job_dashboard_shows_charts_heatmap_diagnosis_and_checkpoints(served: Served, page: Any) -> None:
    job_id = in_app(served, lambda: seed.make_job(served.owner_id))
    page.goto(f"{served.base_url}/ui/jobs/{job_id}?key={served.secret}")
    page.wait_for_selector("body[data-loaded=true]")

    # the key went to localStorage and out of the URL
    assert "key=" not in page.url
    assert page.evaluate("localStorage.getItem('stabletrain.apiKey')") == served.secret
    # header links
    for href in ("/ui/", "/docs", "/v1/openapi.json"):
        assert page.locator(f"header a[href='{href}']").count() >= 1

    assert page.inner_text("#job-status") == "succeeded"
    for chart in ("chart-loss", "chart-grad", "chart-lr"):
        assert points(page, chart) == 200, chart
        assert page.locator(f"#{chart} canvas").count() == 1
    assert page.get_attribute("#chart-loss", "data-val-points") == "4"
    series = page.evaluate("""() => {
        const c = window.stDashboard.state.charts;
        return {loss: c.loss.data[1].filter(v => v !== null).length, grad: c.grad.series.map(s => s.label),
                clip: c.grad.data[3][0], distr: c.grad.scales.y.distr};
    }""")
    assert series["loss"] == 199  # one step was non-finite
    assert "clip max_norm 1" in series["grad"] and series["clip"] == 1.0
    assert series["distr"] == 3  # log scale

    # layer rows in depth order (recorded positions), the same order as the PNG heatmap (app/plots/order.py)
    assert page.evaluate("window.stDashboard.heatmap.layers") == seed.LAYERS
    names = ["head.weight", "blocks.10.mlp.proj.weight", "blocks.2.attn.proj.weight", "pos_emb.weight",
             "blocks.2.attn.qkv.weight", "tok_emb.weight", "blocks.10.attn.qkv.weight", "blocks.2.mlp.fc.weight"]
    assert page.evaluate("(n) => window.stDashboard.depthOrder(n)", names) == depth_order(names)
    heat = page.locator("#heatmap")
    assert heat.get_attribute("data-layers") == str(len(seed.LAYERS))
    assert heat.get_attribute("data-steps") == "20"
    assert int(heat.get_attribute("data-cells") or 0) > 100
    assert heat.get_attribute("data-nonfinite") == "1"
    stats = canvas_stats(page, "#heatmap canvas")
    assert stats["painted"] > 0.3 * stats["width"] * stats["height"] and stats["colours"] > 20, stats

    diagnosis = page.locator("#diagnosis")
    assert diagnosis.locator(".finding").count() == 2
    assert diagnosis.locator(".finding[data-kind=exploding]").is_visible()
    assert "gradient norm spiked to 80" in diagnosis.inner_text()
    recommendation = diagnosis.locator("tr.rec", has_text="model.residual")
    assert recommendation.is_visible()
    assert "skip connections" in recommendation.inner_text()
    # one health: the header badge and the diagnosis panel show the job's health (its worst finding)
    assert page.inner_text("#job-health") == page.inner_text("#diag-summary .badge") == "critical"

    assert page.locator("#events-body tr[data-kind=step_skipped]").count() == 1
    # the loss spike's attribution: the batch rows with the highest loss, excerpts shown as text
    spike_rows = page.locator("#events-body tr[data-kind=loss_spike] .attr-row")
    assert spike_rows.count() == 2
    first_row = spike_rows.nth(0).locator("td").all_inner_texts()
    assert first_row == ["8192", "11.5", "<script>x</script> ZZZZ qqqq garbled"]
    assert "the quick brown fox" in spike_rows.nth(1).inner_text()
    assert page.locator("#events-body script").count() == 0
    assert page.locator("#events-body tr[data-kind=step_skipped] .attribution").count() == 0

    # activations: saturation of the recurrent layers (depth order), their gradient through time, no attention
    act = page.locator("#act-heatmap")
    assert act.get_attribute("data-metric") == "saturated_frac"
    assert page.evaluate("window.stDashboard.actHeatmap.layers") == ["layers.0.rnn", "layers.1.rnn"]
    assert act.get_attribute("data-steps") == "20" and int(act.get_attribute("data-cells") or 0) > 20
    act_stats = canvas_stats(page, "#act-heatmap canvas")
    assert act_stats["colours"] > 10, act_stats
    assert page.locator("#grad-time-panel").is_visible() and page.locator("#attn-panel").is_hidden()
    grad_time = page.locator("#chart-grad-time")
    assert grad_time.get_attribute("data-series") == "2" and grad_time.get_attribute("data-points") == "20"
    time_chart = page.evaluate("""() => { const c = window.stDashboard.state.charts.gradTime;
        return {labels: c.series.map(s => s.label), distr: c.scales.y.distr, last: c.data[1].at(-1)}; }""")
    assert time_chart["labels"][1:] == ["layers.0.rnn", "layers.1.rnn"] and time_chart["distr"] == 3
    assert abs(time_chart["last"] - 10.0 ** (-1 - 200 / 40)) < 1e-12
    link = page.locator("a.ckpt-download[data-step='200']")
    assert link.is_visible()
    assert link.get_attribute("href") == f"/v1/jobs/{job_id}/checkpoints/200/file"
    with page.expect_download() as download:
        link.click()
    assert download.value.suggested_filename == f"{job_id}_step_200.pt"
    assert Path(download.value.path()).read_bytes() == b"stabletrain test checkpoint 200"

    # PNG links open the rendered plot (fetched with the key, shown as a blob)
    with page.expect_popup() as popup:
        page.click("a.png-link[data-plot=layers]")
    assert popup.value.url.startswith("blob:")
    popup.value.close()

    screenshot(page, "dashboard-finished-job.png")

    # the jobs list links to it with its status
    page.goto(f"{served.base_url}/ui/")
    row = page.locator(f"#jobs-body tr[data-job-id='{job_id}']")
    row.wait_for()
    assert "succeeded" in row.inner_text()
    assert row.locator(f"a[href='/ui/jobs/{job_id}']").count() == 1
    screenshot(page, "dashboard-jobs.png")


def test_transformer_job_shows_dead_units_with_a_toggle_and_attention_logits(served: Served, page: Any) -> None:
    job_id = in_app(served, lambda: seed.make_job(served.owner_id, name="tf", sites=seed.TRANSFORMER_SITES))
    page.goto(f"{served.base_url}/ui/jobs/{job_id}?key={served.secret}")
    page.wait_for_selector("body[data-loaded=true]")
    act = page.locator("#act-heatmap")
    # no site saturates: the page opens on dead units, ReLU sites only, in depth order
    assert act.get_attribute("data-metric") == "dead_frac" and page.is_checked("#act-dead")
    assert page.evaluate("window.stDashboard.actHeatmap.layers") == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    assert act.get_attribute("data-steps") == "20"
    page.check("#act-saturated")
    wait_until(lambda: act.get_attribute("data-metric") == "saturated_frac", 5, "the toggle")
    assert act.get_attribute("data-layers") == "0"  # nothing saturates in this model
    page.check("#act-dead")
    wait_until(lambda: act.get_attribute("data-layers") == "2", 5, "the dead-unit rows to come back")
    assert page.locator("#attn-panel").is_visible() and page.locator("#grad-time-panel").is_hidden()
    attn = page.evaluate("""() => { const c = window.stDashboard.state.charts.attn;
        return {labels: c.series.map(s => s.label), first: c.data[1][0], points: c.data[0].length}; }""")
    assert attn == {"labels": ["step", "blocks.0.attn", "blocks.1.attn"], "first": 6.0, "points": 20}
    screenshot(page, "dashboard-transformer-activations.png")


CUSTOM = ["stem.weight", "body.0.weight", "body.1.weight", "readout.weight"]  # names the heuristic misorders


def test_heatmap_rows_follow_recorded_positions_and_fall_back_to_names(served: Served, page: Any) -> None:
    assert depth_order(CUSTOM) != CUSTOM
    for positions, expected in ((True, CUSTOM), (False, depth_order(CUSTOM))):
        job_id = in_app(served, lambda p=positions: seed.make_job(served.owner_id, name=f"custom-{p}",
                                                                  layer_names=CUSTOM, positions=p))
        page.goto(f"{served.base_url}/ui/jobs/{job_id}?key={served.secret}")
        page.wait_for_selector("body[data-loaded=true]")
        assert page.evaluate("window.stDashboard.heatmap.layers") == expected, positions
        assert page.get_attribute("#heatmap", "data-layers") == str(len(CUSTOM))
    # the dashboard's rule is app/plots/order.py's layer_order: positions when every layer has one
    cases = [
        [["readout.weight", 3], ["stem.weight", 0], ["body.1.weight", 2], ["body.0.weight", 1]],
        [["readout.weight", 3], ["stem.weight", None], ["body.1.weight", 2], ["body.0.weight", 1]],
        [["b", 1], ["a", 1], ["head.weight", 0]],
    ]
    for case in cases:
        got = page.evaluate("""(c) => window.stDashboard.layerOrder(c.map((x) => x[0]),
            new Map(c.filter((x) => x[1] !== null).map((x) => [x[0], x[1]])))""", case)
        assert got == layer_order([{"layer": n, "position": p} for n, p in case]), case


def test_running_job_dashboard_grows_while_steps_arrive_and_stops_when_it_ends(served: Served, page: Any) -> None:
    job_id = in_app(served, lambda: seed.make_job(served.owner_id, status="running", steps=30, name="live-lstm"))
    page.goto(f"{served.base_url}/ui/jobs/{job_id}?key={served.secret}")
    page.wait_for_selector("body[data-loaded=true]")
    assert page.inner_text("#job-status") == "running"
    assert points(page, "chart-loss") == 30
    assert page.get_attribute("#heatmap", "data-steps") == "3"

    in_app(served, lambda: seed.add_steps(job_id, 31, 90))
    wait_until(lambda: points(page, "chart-loss") == 90, 20, "the loss chart to reach 90 points")
    assert points(page, "chart-grad") == 90 and points(page, "chart-lr") == 90
    wait_until(lambda: page.get_attribute("#heatmap", "data-steps") == "9", 20, "the heatmap to grow")
    assert page.evaluate("window.stDashboard.state.charts.loss.data[0].at(-1)") == 90
    screenshot(page, "dashboard-running-job.png")

    def roll_back() -> None:  # the engine rolled back to step 60 and wrote steps 61..90 again
        for step in range(61, 91):
            db.session.get(StepMetric, (job_id, step)).loss = 1.25
        db.session.add(Event(job_id=job_id, step=90, kind="rollback", message="rolled back to step 60"))
        db.session.commit()

    in_app(served, roll_back)
    wait_until(lambda: page.evaluate("window.stDashboard.state.loss[69]") == 1.25, 20,
               "the rewritten steps to replace the shown ones after a rollback event")
    assert points(page, "chart-loss") == 90

    def finish() -> None:
        job = db.session.get(Job, job_id)
        job.status, job.finished_at = "succeeded", seed.utcnow()
        job.diagnosis = {"findings": seed.FINDINGS[:1], "summary": seed.FINDINGS[0]["summary"]}
        seed.add_checkpoint(job_id, 90)
        db.session.commit()

    in_app(served, finish)
    page.wait_for_selector("body[data-job-status=succeeded]")
    assert page.locator("#diagnosis .finding[data-kind=exploding]").is_visible()
    assert page.locator("a.ckpt-download[data-step='90']").is_visible()
    # polling stopped: rows added now never show up
    in_app(served, lambda: seed.add_steps(job_id, 91, 95, layers=False))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.wait_for_timeout(2500)  # longer than one poll period, to observe that no poll happens
    assert points(page, "chart-loss") == 90
    assert not [u for u in requests if "/metrics" in u]


def test_dashboard_asks_for_a_key_and_rejects_a_wrong_one(served: Served, page: Any) -> None:
    page.goto(f"{served.base_url}/ui/")
    page.evaluate("localStorage.removeItem('stabletrain.apiKey')")
    page.reload()
    assert page.locator("#key-panel").is_visible()
    page.fill("#key-input", "st_not_a_real_key")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#key-message:has-text('did not accept')")
    page.fill("#key-input", served.secret)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#jobs-body tr")
    assert page.locator("#key-panel").is_hidden()


def test_pause_and_resume_buttons_follow_the_job(served: Served, page: Any) -> None:
    job_id = in_app(served, lambda: seed.make_job(served.owner_id, status="running", steps=30, name="pausable"))
    page.goto(f"{served.base_url}/ui/jobs/{job_id}?key={served.secret}")
    page.wait_for_selector("body[data-job-status=running]")
    assert page.locator("#job-pause").is_visible() and not page.locator("#job-resume").is_visible()

    page.click("#job-pause")
    page.wait_for_selector("#job-status[data-status=pausing]")
    assert not page.locator("#job-pause").is_visible() and not page.locator("#job-resume").is_visible()
    assert in_app(served, lambda: db.session.get(Job, job_id).status) == "pausing"

    def worker_pauses() -> None:
        job = db.session.get(Job, job_id)
        job.status, job.paused_at = "paused", seed.utcnow()
        db.session.commit()

    in_app(served, worker_pauses)
    page.wait_for_selector("body[data-job-status=paused]")  # still polled while pausing
    assert page.locator("#job-resume").is_visible() and not page.locator("#job-pause").is_visible()

    page.click("#job-resume")
    page.wait_for_selector("body[data-job-status=queued]")  # polling starts again after the resume
    assert in_app(served, lambda: db.session.get(Job, job_id).status) == "queued"
    assert page.locator("#job-pause").is_visible() and not page.locator("#job-resume").is_visible()
    screenshot(page, "dashboard-resumed-job.png")
