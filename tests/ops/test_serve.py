"""scripts/serve.sh supervises its processes: a training worker SIGKILLed mid-job is started again and the
job finishes with every step recorded once.

The real command runs on the embedded defaults (SQLite database and broker) in a temp folder, on a free
port, with a short lease so the dead worker's job is requeued within seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select

from app.models import Job
from tests.ops.helpers import BIN, REPO, free_port, get, stop_group
from worker.testing import wait_for

pytestmark = pytest.mark.integration

MAX_STEPS = 600
KILL_AFTER_STEP = 60  # past the first checkpoint (every 50 steps)
SPEC = {
    "name": "supervised",
    "model": {"arch": "lstm", "n_layers": 2, "d_model": 64, "hidden": 128},
    "training": {"max_steps": MAX_STEPS, "batch_size": 16, "seq_len": 64, "eval_every": 100, "seed": 3},
    "monitoring": {"layer_stats_every": 20},
    "checkpointing": {"every_steps": 50, "keep_last": 2},
}


class Api:
    """JSON calls to the served API with the dev key."""

    def __init__(self, base: str, key: str) -> None:
        self.base, self.headers = base, {"Authorization": f"Bearer {key}"}

    def call(self, path: str, body: bytes | None = None, content_type: str = "application/json") -> Any:
        headers = {**self.headers, **({"Content-Type": content_type} if body is not None else {})}
        request = urllib.request.Request(self.base + path, data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def steps(self, job_id: str) -> list[int]:
        rows: list[int] = []
        while True:
            page = self.call(f"/v1/jobs/{job_id}/metrics?limit=1000&after_step={rows[-1] if rows else 0}")
            rows += [row["step"] for row in page["items"]]
            if not page["items"] or len(rows) >= MAX_STEPS + 5:
                return rows


def job_row(engine: Engine, job_id: str) -> Any:
    """The job's record (the API view leaves out which worker holds it)."""
    with engine.connect() as conn:
        return conn.execute(select(Job.status, Job.step, Job.worker_id, Job.attempts).where(Job.id == job_id)).one()


def supervised_pid(env: dict[str, str], program: str) -> int:
    out = subprocess.run([str(BIN / "supervisorctl"), "-c", "scripts/supervisord.conf", "pid", program],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    return int(out.stdout.strip()) if out.stdout.strip().isdigit() else 0


def test_killed_training_worker_is_restarted_and_the_job_finishes(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    env = {**os.environ, "SERVE_DIR": str(tmp_path / "serve"), "PORT": str(port), "WEB_CONCURRENCY": "1",
           "STABLETRAIN_DATABASE_URL": f"sqlite:///{tmp_path / 'stabletrain.db'}",
           "STABLETRAIN_BROKER_URL": f"sqlalchemy+sqlite:///{tmp_path / 'broker.db'}",
           "STABLETRAIN_STORAGE_DIR": str(tmp_path / "storage"), "STABLETRAIN_DEVICE": "cpu",
           "STABLETRAIN_LEASE_S": "3", "STABLETRAIN_HEARTBEAT_S": "0.5", "STABLETRAIN_RECONCILE_EVERY_S": "1",
           "OMP_NUM_THREADS": "1", "STOP_WAIT_S": "20"}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - the child writes it
    serve = subprocess.Popen([str(REPO / "scripts" / "serve.sh")], cwd=REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    engine = create_engine(env["STABLETRAIN_DATABASE_URL"])
    try:
        wait_for(lambda: get(f"{base}/readyz", timeout_s=5)[0] == 200 or serve.poll() is not None, 180,
                 "serve.sh to answer /readyz")
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        api = Api(base, (tmp_path / "serve" / "dev-api-key").read_text().strip())
        dataset = api.call("/v1/datasets?name=corpus", (REPO / "tests" / "data" / "corpus.txt").read_bytes(),
                           "text/plain")
        job_id = api.call("/v1/jobs", json.dumps({**SPEC, "dataset_id": dataset["id"]}).encode())["id"]

        first = wait_for(lambda: (j := job_row(engine, job_id)).step >= KILL_AFTER_STEP and j, 300,
                         f"the job to pass step {KILL_AFTER_STEP}", every_s=0.02)
        assert first.status == "running" and first.step < MAX_STEPS, first
        victim = int(first.worker_id.rsplit(":", 1)[1])  # <host>:<pid> of the training worker
        assert victim == supervised_pid(env, "train")
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        restarted = wait_for(lambda: (pid := supervised_pid(env, "train")) not in (0, victim) and pid, 120,
                             "supervisord to start the training worker again")
        again = wait_for(lambda: (j := job_row(engine, job_id)).status == "running"
                         and j.worker_id != first.worker_id and j, 120, "the job to run again", every_s=0.02)
        recovery_s = time.monotonic() - killed_at
        assert int(again.worker_id.rsplit(":", 1)[1]) == restarted and again.attempts == first.attempts + 1

        wait_for(lambda: job_row(engine, job_id).status in ("succeeded", "failed", "cancelled"), 600,
                 "the job to finish", every_s=0.5)
        final = api.call(f"/v1/jobs/{job_id}")
        assert final["status"] == "succeeded" and final["attempts"] == 2, final
        assert api.steps(job_id) == list(range(1, MAX_STEPS + 1))  # every step once, none missing
        kinds = [event["kind"] for event in api.call(f"/v1/jobs/{job_id}/events?limit=500")["items"]]
        assert "requeued" in kinds and "resumed" in kinds, kinds
        with capsys.disabled():
            print(f"\nserve.sh: training worker SIGKILLed at step {first.step}; restarted by supervisord, "
                  f"job running again after {recovery_s:.1f} s (lease 3 s), finished with steps 1..{MAX_STEPS} once")
    finally:
        stop_group(serve)
        log.close()
        engine.dispose()
    assert serve.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert supervised_pid(env, "train") == 0  # nothing left running
