"""Sample requests never take the API's request threads: under gunicorn as deployed (gthread, 4 threads a
worker, here one worker), a burst of 16 concurrent sample requests, half of them asking to wait, leaves job
reads and /readyz answering at once: job-read p99 under 50 ms (see LOADED_FACTOR for loaded machines).

Before samples were queued and answered 202, each request held its thread for up to 30 s: four of them
took every thread of the worker, and every other route (job reads, /readyz) queued behind them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from app.extensions import db
from app.models import Checkpoint
from tests.client.servers import free_port

REPO = Path(__file__).resolve().parents[2]
GUNICORN = Path(sys.executable).parent / "gunicorn"
READS = 150
PACE_S = 0.02  # 50 reads a second: 3 s of reads
WAIT_S = 8  # the waiting sample request outlasts the reads
P99_LIMIT_MS = 50.0
# On a machine already slower than the limit at rest (CI runners shared with other jobs), the bar is this
# many times the p99 measured just before the burst. The old code failed by orders of magnitude: reads
# waited for the samples' whole wait (seconds).
LOADED_FACTOR = 3.0


@pytest.fixture
def gunicorn(app: Flask, tmp_path: Path) -> Iterator[str]:
    """The app's database, broker and storage served by gunicorn (1 worker x 4 gthread threads)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STABLETRAIN_")}
    env.update({
        "STABLETRAIN_DATABASE_URL": app.config["DATABASE_URL"],
        "STABLETRAIN_BROKER_URL": app.config["BROKER_URL"],
        "STABLETRAIN_STORAGE_DIR": app.config["STORAGE_DIR"],
        "STABLETRAIN_RATELIMIT_DEFAULT": "1000000/minute",
        "STABLETRAIN_LOG_LEVEL": "WARNING",
    })
    port = free_port()
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        web = subprocess.Popen([str(GUNICORN), "--bind", f"127.0.0.1:{port}", "--workers", "1", "--worker-class",
                                "gthread", "--threads", "4", "app:create_app()"], cwd=REPO, env=env, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert web.poll() is None, f"gunicorn exited:\n{log.read_text()[-2000:]}"
            try:
                if requests.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"gunicorn never answered:\n{log.read_text()[-2000:]}"
            time.sleep(0.1)
        yield base
    finally:
        web.terminate()
        try:
            web.wait(timeout=20)
        except subprocess.TimeoutExpired:
            web.kill()
            web.wait()


def _job_with_checkpoint(app: Flask, client: FlaskClient, headers: dict[str, str], upload: Any, submit: Any) -> str:
    job_id = submit(headers, upload(headers).json["id"]).json["id"]
    with app.app_context():
        db.session.add(Checkpoint(job_id=job_id, step=10, bytes=1, sha256="0" * 64))
        db.session.commit()
    return job_id


def _paced_read_times_ms(session: requests.Session, url: str, headers: dict[str, str]) -> list[float]:
    """READS job reads, one due every PACE_S; each latency counts from its due time (a read held up
    makes the ones due behind it late too, as for a client polling on a timer). Sorted."""
    times: list[float] = []
    start = time.perf_counter()
    for i in range(READS):
        due = start + i * PACE_S
        time.sleep(max(0.0, due - time.perf_counter()))
        response = session.get(url, headers=headers, timeout=30)
        times.append((time.perf_counter() - due) * 1000)
        assert response.status_code == 200, response.text[:200]
    return sorted(times)


def _p99(times: list[float]) -> float:
    return times[min(len(times) - 1, int(len(times) * 0.99))]


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_sample_burst_leaves_reads_fast(app: Flask, client: FlaskClient, make_auth: Any, upload: Any, submit: Any,
                                        gunicorn: str) -> None:
    keys = [make_auth("a"), make_auth("b")]
    jobs = [_job_with_checkpoint(app, client, h, upload, submit) for h in keys]
    reader = requests.Session()
    job_url = f"{gunicorn}/v1/jobs/{jobs[0]}"
    for _ in range(20):  # warm-up: imports, pools
        reader.get(job_url, headers=keys[0], timeout=30)
    before = _paced_read_times_ms(reader, job_url, keys[0])

    def sample(i: int) -> int:
        key = i % 2  # 8 per key (the default per-key cap); key b's all ask to wait
        query = f"?wait={WAIT_S}" if key else ""
        response = requests.post(f"{gunicorn}/v1/jobs/{jobs[key]}/samples{query}", json={"prompt": str(i)},
                                 headers=keys[key], timeout=30)
        return response.status_code

    with ThreadPoolExecutor(16) as pool:
        burst = [pool.submit(sample, i) for i in range(16)]
        # all but the one request allowed to wait (SAMPLE_MAX_WAITING) answer while it still waits
        answered = _wait_until(lambda: sum(f.done() for f in burst) >= 15, WAIT_S / 2)
        assert answered and not all(f.done() for f in burst), (
            f"{sum(f.done() for f in burst)} of 16 sample requests answered within {WAIT_S / 2} s")
        during = _paced_read_times_ms(reader, job_url, keys[0])
        ready = requests.get(f"{gunicorn}/readyz", timeout=30)
        assert not all(f.done() for f in burst), "the reads did not overlap the waiting sample request"
        codes = [f.result() for f in burst]
    assert codes == [202] * 16, codes
    assert ready.status_code == 200, ready.text[:300]
    p99, limit = _p99(during), max(P99_LIMIT_MS, LOADED_FACTOR * _p99(before))
    print(f"job reads while a sample request waits: p50 {during[len(during) // 2]:.1f} ms, p99 {p99:.1f} ms "
          f"(before the burst: p50 {before[len(before) // 2]:.1f} ms, p99 {_p99(before):.1f} ms)")
    assert p99 < limit, f"job read p99 {p99:.1f} ms while sample requests were outstanding (limit {limit:.1f} ms)"
