"""The dashboard of a job that a real `celery worker` is training (integration: real broker, real worker).

The stack fixture comes from tests/integration (database, broker, worker process); its app is
served over HTTP here so that headless chromium loads /ui like a user would.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration import conftest as integration
from tests.ui.browser import canvas_stats, points, require_browser, screenshot, serve, wait_until

pytestmark = pytest.mark.integration

corpus = integration.corpus  # fixture reused from tests/integration/conftest.py


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[integration.Stack]:
    """tests/integration's Stack on the embedded backends (SQLite database + SQLite broker) only.

    Its own broker file, so this worker never shares queues with the integration suite's workers
    (the `servers` variant of that fixture uses one fixed Redis database); the dashboard does not
    depend on the backend, which tests/integration covers."""
    require_browser()
    root = tmp_path_factory.mktemp("ui-live-stack")
    st = integration.Stack("ui-live", f"sqlite:///{root / 'stabletrain.db'}",
                           f"sqlalchemy+sqlite:///{root / 'broker.db'}", root)
    try:
        st.migrate()
        st.start_worker()
        yield st
    finally:
        failed = request.session.testsfailed
        st.close()
        if failed:
            print(f"\n--- worker log (ui-live) ---\n{st.log_tail()}")

LIVE_JOB: dict[str, Any] = {
    "name": "live-ui-lstm",
    "model": {"arch": "lstm", "n_layers": 2, "d_model": 32, "hidden": 32},
    "training": {"max_steps": 1_000_000, "batch_size": 8, "seq_len": 32, "eval_every": 20},
    "stabilization": {"clip": {"mode": "norm", "max_norm": 0.5}},
    "monitoring": {"layer_stats_every": 5},
    "checkpointing": {"every_steps": 25, "keep_last": 2},
}


def test_dashboard_follows_a_running_job_then_samples_from_it(stack: integration.Stack, corpus: bytes,
                                                               page: Any) -> None:
    resp = stack.api("POST", "/v1/datasets", data={"file": (io.BytesIO(corpus), "corpus.txt")},
                     content_type="multipart/form-data")
    assert resp.status_code in (200, 201), resp.get_json()
    resp = stack.api("POST", "/v1/jobs", json={**LIVE_JOB, "dataset_id": resp.get_json()["id"]})
    assert resp.status_code == 202, resp.get_json()
    job_id = resp.get_json()["id"]
    secret = stack.auth["Authorization"].split(" ", 1)[1]
    with serve(stack.app) as base_url:
        page.goto(f"{base_url}/ui/jobs/{job_id}?key={secret}")
        page.wait_for_selector("body[data-loaded=true]")
        wait_until(lambda: points(page, "chart-loss") > 0, 120, f"first steps on the page\n{stack.log_tail()}")
        first = points(page, "chart-loss")
        wait_until(lambda: points(page, "chart-loss") > first + 5, 60, "the loss chart to grow while training")
        assert page.inner_text("#job-status") in ("running", "cancelling")
        assert points(page, "chart-grad") == points(page, "chart-lr") >= first
        wait_until(lambda: int(page.get_attribute("#heatmap", "data-cells") or 0) > 0, 60, "layer statistics")
        stats = canvas_stats(page, "#heatmap canvas")
        assert stats["colours"] > 10, stats
        screenshot(page, "dashboard-live-worker-running.png")

        cancel = stack.api("POST", f"/v1/jobs/{job_id}/cancel")
        assert cancel.status_code in (200, 202), cancel.get_json()
        page.wait_for_selector("body[data-job-status=cancelled]", timeout=120_000)
        final = stack.api("GET", f"/v1/jobs/{job_id}").get_json()
        wait_until(lambda: points(page, "chart-loss") >= final["progress"]["step"], 10, "the last steps")
        page.locator("a.ckpt-download").first.wait_for()
        assert page.get_attribute("#diagnosis", "data-findings") is not None

        # the worker is free again: sample through the page's form
        page.fill("#sample-prompt", "The ")
        page.fill("#sample-tokens", "40")
        page.click("#sample-go")
        page.wait_for_selector("#sample-out:not([hidden])", timeout=120_000)
        assert len(page.inner_text("#sample-out")) > 0
        assert "from checkpoint step" in page.inner_text("#sample-status")
        screenshot(page, "dashboard-live-worker-cancelled.png")
