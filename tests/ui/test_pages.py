"""The /ui pages themselves (no browser): served without a key, same-origin only."""

from __future__ import annotations

from flask.testing import FlaskClient


def test_ui_pages_are_served_without_a_key_and_load_nothing_from_other_origins(client: FlaskClient) -> None:
    for path in ("/ui/", "/ui/jobs/job_x"):
        response = client.get(path)
        assert response.status_code == 200 and response.mimetype == "text/html"
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        assert response.headers["Referrer-Policy"] == "no-referrer"
        html = response.get_data(as_text=True)
        assert "http://" not in html and "https://" not in html
        assert 'href="/docs"' in html and 'href="/v1/openapi.json"' in html
    for asset in ("vendor/uplot/uPlot.iife.min.js", "vendor/uplot/uPlot.min.css", "vendor/uplot/LICENSE",
                  "dashboard.js", "heatmap.js", "dashboard.css", "favicon.svg"):
        response = client.get(f"/ui/static/{asset}")
        assert response.status_code == 200, asset
        response.close()


def test_job_page_escapes_the_job_id(client: FlaskClient) -> None:
    html = client.get('/ui/jobs/"><script>x</script>').get_data(as_text=True)
    assert "<script>x</script>" not in html


def test_job_page_has_pause_and_resume_buttons(client: FlaskClient) -> None:
    html = client.get("/ui/jobs/job_x").get_data(as_text=True)
    # hidden until the job's status allows the action (dashboard.js shows them)
    assert '<button type="button" id="job-pause" hidden' in html and ">Pause</button>" in html
    assert '<button type="button" id="job-resume" hidden' in html and ">Resume</button>" in html
    listing = client.get("/ui/").get_data(as_text=True)
    assert "<option>pausing</option><option>paused</option>" in listing
