"""The `stabletrain` command and the client end to end: HTTP API + a real Celery worker process
on the embedded defaults (SQLite, SQLAlchemy broker, storage folder)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from stabletrain import ChecksumError
from tests.client.conftest import CORPUS, CliResult, Live
from tests.client.servers import CORRUPT, TRUNCATE, Stub
from worker.testing import wait_for

pytestmark = pytest.mark.integration

TINY: dict[str, Any] = {
    "name": "client-tiny-lstm",
    "model": {"arch": "lstm", "n_layers": 1, "d_model": 32, "hidden": 32},
    "training": {"max_steps": 30, "batch_size": 8, "seq_len": 32, "eval_every": 10},
    "monitoring": {"layer_stats_every": 5},
    "checkpointing": {"every_steps": 10, "keep_last": 3},
}

# relu rnn, large normal init, sgd at lr 1.0, no clipping, stop on the first NaN: blows up in a few steps
EXPLODING: dict[str, Any] = {
    "name": "client-exploding-rnn",
    "model": {"arch": "rnn", "n_layers": 2, "d_model": 32, "hidden": 64, "activation": "relu",
              "init": "normal", "init_std": 0.1},
    "training": {"max_steps": 200, "batch_size": 8, "seq_len": 32, "optimizer": "sgd", "lr": 1.0},
    "stabilization": {"clip": {"mode": "none"}, "nonfinite": "stop"},
}


def write_spec(tmp: Path, spec: dict[str, Any], name: str = "spec.json") -> str:
    path = tmp / name
    path.write_text(json.dumps(spec))
    return str(path)


@pytest.fixture(scope="module")
def trained(live: Live, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`stabletrain upload` + `stabletrain submit --wait` of the tiny spec (one training for the module)."""
    tmp = tmp_path_factory.mktemp("client-cli")
    up = live.cli("--json", "upload", str(CORPUS), "--name", "corpus")
    assert up.rc == 0, up
    dataset_id = json.loads(up.out)["id"]
    res = live.cli("submit", write_spec(tmp, TINY), "--dataset", dataset_id, "--wait", "--poll", "0.2")
    job_id = next(line.split()[1] for line in res.err.splitlines() if line.startswith("submitted "))
    return {"result": res, "job_id": job_id, "dataset_id": dataset_id}


def test_submit_wait_succeeds_with_progress_and_diagnosis(live: Live, trained: dict[str, Any]) -> None:
    res: CliResult = trained["result"]
    assert res.rc == 0, f"{res}\n{live.stack.log_tail()}"
    job_id = trained["job_id"]
    lines = res.out.splitlines()
    assert lines[0].startswith(f"job {job_id} succeeded at step 30/30") and "loss" in lines[0]
    assert lines[1].startswith("diagnosis (") and len(lines[1]) > len("diagnosis (ok): ")
    diagnosis = live.stack.api("GET", f"/v1/jobs/{job_id}/diagnosis").get_json()
    for text in [f["summary"] for f in diagnosis["findings"]] or [diagnosis["summary"]]:
        assert text in res.out
    assert "30/30" in res.err and "loss=" in res.err and "grad_norm=" in res.err and "health=" in res.err


def test_failing_spec_exits_1_with_reason_and_recommendations(live: Live, trained: dict[str, Any],
                                                              tmp_path: Path) -> None:
    res = live.cli("submit", write_spec(tmp_path, EXPLODING), "--dataset", trained["dataset_id"],
                   "--wait", "--poll", "0.2", "--no-progress")
    assert res.rc == 1, f"{res}\n{live.stack.log_tail()}"
    head, error = res.out.splitlines()[:2]
    assert " failed at step " in head
    assert error.startswith("error: ") and "non-finite" in error and "nonfinite" in error
    assert "diagnosis (critical)" in res.out and "[critical]" in res.out
    assert "      -> " in res.out and " — " in res.out  # field: value — why
    res_json = live.cli("--json", "wait", head.split()[1], "--no-progress")
    assert res_json.rc == 1
    body = json.loads(res_json.out)
    assert body["job"]["status"] == "failed" and body["diagnosis"]["findings"]


def test_download_verifies_sha256_and_loads(live: Live, trained: dict[str, Any], tmp_path: Path) -> None:
    job_id = trained["job_id"]
    res = live.cli("download", job_id, "-o", str(tmp_path))
    assert res.rc == 0, res
    path = tmp_path / f"{job_id}_step_30.pt"
    assert res.out.startswith(f"saved {path} (") and "sha256 verified" in res.out
    state = torch.load(path, weights_only=True)
    assert state["step"] == 30 and state["format"] == "stabletrain-ckpt-v1"

    res = live.cli("download", job_id, "--step", "20", "-o", str(tmp_path / "twenty.pt"))
    assert res.rc == 0, res
    assert torch.load(tmp_path / "twenty.pt", weights_only=True)["step"] == 20
    res = live.cli("download", job_id, "--step", "7")
    assert res.rc == 3 and "no checkpoint at step 7 (it has: 10, 20, 30)" in res.err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, "twenty.pt"]  # no temp files left


def test_download_resumes_a_broken_stream_and_rejects_a_corrupt_one(live: Live, trained: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    job_id = trained["job_id"]
    with Stub(upstream=live.url) as stub:
        client = live.client(url=stub.url, backoff=0.01)
        stub.script("GET", f"/v1/jobs/{job_id}/checkpoints/30/file", TRUNCATE)
        with client:
            path = client.download(job_id, dest=tmp_path / "resumed.pt")
        gets = stub.requests_to("GET", f"/v1/jobs/{job_id}/checkpoints/30/file")
        assert len(gets) == 2 and "Range" not in gets[0].headers
        assert gets[1].headers["Range"].startswith("bytes=") and gets[1].headers["If-Range"].startswith('"')
        assert torch.load(path, weights_only=True)["step"] == 30

        stub.script("GET", f"/v1/jobs/{job_id}/checkpoints/30/file", CORRUPT)
        with live.client(url=stub.url) as client, pytest.raises(ChecksumError, match="sha256"):
            client.download(job_id, dest=tmp_path / "corrupt.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resumed.pt"]


def test_metrics_iterate_all_pages(live: Live, trained: dict[str, Any]) -> None:
    job_id = trained["job_id"]
    with Stub(upstream=live.url) as stub, live.client(url=stub.url) as client:
        rows = list(client.metrics(job_id, limit=7))
        assert [r["step"] for r in rows] == list(range(1, 31))
        assert len(stub.requests_to("GET", f"/v1/jobs/{job_id}/metrics?")) == 5  # 7+7+7+7+2
        assert [r["step"] for r in client.metrics(job_id, after_step=25)] == [26, 27, 28, 29, 30]
        layers = list(client.layer_metrics(job_id, limit=3))
        assert {r["step"] for r in layers} == {5, 10, 15, 20, 25, 30}
        events = list(client.events(job_id, limit=2))
        assert events[0]["kind"] == "started" and events[-1]["kind"] == "finished"

    res = live.cli("metrics", job_id, "--format", "csv", "--limit", "7")
    assert res.rc == 0, res
    table = list(csv.DictReader(io.StringIO(res.out)))
    assert [int(r["step"]) for r in table] == list(range(1, 31)) and {"loss", "grad_norm"} <= set(table[0])
    res = live.cli("metrics", job_id, "--layers")
    assert res.rc == 0 and {json.loads(line)["step"] for line in res.out.splitlines()} == {5, 10, 15, 20, 25, 30}


def test_status_jobs_events_diagnose_commands(live: Live, trained: dict[str, Any]) -> None:
    job_id = trained["job_id"]
    res = live.cli("status", job_id)
    assert res.rc == 0 and "succeeded" in res.out and "step 30/30 (100.0%)" in res.out and "loss" in res.out
    res = live.cli("--json", "status", job_id)
    assert json.loads(res.out)["progress"]["step"] == 30
    res = live.cli("jobs", "--status", "succeeded")
    assert res.rc == 0 and job_id in res.out
    res = live.cli("events", job_id)
    assert res.rc == 0 and "started" in res.out and "checkpoint" in res.out and "finished" in res.out
    res = live.cli("diagnose", job_id)
    assert res.rc == 0 and res.out.startswith(f"{job_id} succeeded\ndiagnosis (")


def test_sample_from_the_newest_checkpoint(live: Live, trained: dict[str, Any]) -> None:
    res = live.cli("sample", trained["job_id"], "--prompt", "The ", "--max-new-tokens", "20", "--seed", "1")
    assert res.rc == 0 and res.out.strip(), f"{res}\n{live.stack.log_tail()}"
    with live.client() as client:
        sample = client.sample(trained["job_id"], "The ", max_new_tokens=10, step=20, wait=0)
    assert sample["status"] == "succeeded" and sample["checkpoint_step"] == 20 and sample["text"]


def test_cancel_a_running_job_and_wait_exits_4(live: Live, trained: dict[str, Any], tmp_path: Path) -> None:
    spec = {**TINY, "name": "client-long", "training": {**TINY["training"], "max_steps": 100_000}}
    res = live.cli("--json", "submit", write_spec(tmp_path, spec), "--dataset", trained["dataset_id"])
    job_id = json.loads(res.out)["id"]
    with live.client() as client:
        wait_for(lambda: client.job(job_id)["progress"]["step"] > 0, 120, "the long job to report steps")
    res = live.cli("cancel", job_id)
    assert res.rc == 0 and job_id in res.out, res
    res = live.cli("wait", job_id, "--poll", "0.2", "--no-progress")
    assert res.rc == 4 and f"job {job_id} cancelled" in res.out, res
