"""The client and the `stabletrain` command against the real API over HTTP (no worker needed:
jobs stay queued). A stub in front of the service plays the gateway that loses answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from stabletrain import ApiError, Client, ConnectionFailed
from tests.client.conftest import REPO, run_cli
from tests.client.servers import FORWARD_504, FORWARD_DROP, Reply, Stub, free_port

MakeClient = Callable[..., Client]
TEXT = "the quick brown fox jumps over the lazy dog. " * 200
SPEC = {"name": "c", "training": {"max_steps": 10, "seq_len": 16}}


def test_retried_submit_makes_one_job(api_url: str, api_key: str, make_client: MakeClient) -> None:
    """The first answer is lost after the job was created, the second is a gateway timeout: the
    third attempt, with the same Idempotency-Key, gets the first job back."""
    direct = make_client(api_url, api_key)
    dataset = direct.upload_text(TEXT, name="fox")
    with Stub(upstream=api_url) as stub:
        stub.script("POST", "/v1/jobs", FORWARD_DROP, FORWARD_504)
        job = make_client(stub.url, api_key).submit(SPEC, dataset_id=dataset["id"])
    posts = stub.requests_to("POST", "/v1/jobs")
    assert len(posts) == 3 and len({p.headers["Idempotency-Key"] for p in posts}) == 1
    jobs = list(direct.jobs())
    assert [j["id"] for j in jobs] == [job["id"]] and job["status"] == "queued"


def test_submit_without_lost_answers_then_replay(api_url: str, api_key: str, make_client: MakeClient) -> None:
    client = make_client(api_url, api_key)
    dataset = client.upload_text(TEXT)
    first = client.submit(SPEC, dataset_id=dataset["id"], idempotency_key="same")
    again = client.submit(SPEC, dataset_id=dataset["id"], idempotency_key="same")
    other = client.submit(SPEC, dataset_id=dataset["id"])
    assert first["id"] == again["id"] != other["id"]
    assert {j["id"] for j in client.jobs()} == {first["id"], other["id"]}


def test_upload_whose_answer_was_lost_is_not_repeated(api_url: str, api_key: str, make_client: MakeClient) -> None:
    with Stub(upstream=api_url) as stub:
        stub.script("POST", "/v1/datasets", FORWARD_DROP)
        with pytest.raises(ConnectionFailed, match="not retried"):
            make_client(stub.url, api_key).upload_text(TEXT)
    assert len(list(make_client(api_url, api_key).list_datasets())) == 1  # stored once, never twice


def test_upload_retried_after_503_stores_one_dataset(api_url: str, api_key: str, make_client: MakeClient,
                                                     tmp_path: Path) -> None:
    path = tmp_path / "fox.txt"
    path.write_text(TEXT)
    with Stub(upstream=api_url) as stub:
        stub.script("POST", "/v1/datasets", Reply(503))
        dataset = make_client(stub.url, api_key).upload(path)
    assert dataset["name"] == "fox.txt" and dataset["bytes"] == len(TEXT)
    assert [d["id"] for d in make_client(api_url, api_key).list_datasets()] == [dataset["id"]]


def test_listings_follow_cursor_pages(api_url: str, api_key: str, make_client: MakeClient) -> None:
    client = make_client(api_url, api_key)
    datasets = [client.upload_text(TEXT + str(i), name=f"d{i}") for i in range(3)]
    ids = [client.submit(SPEC, dataset_id=datasets[0]["id"])["id"] for _ in range(3)]
    client.cancel(ids[0])
    with Stub(upstream=api_url) as stub:
        paged = make_client(stub.url, api_key)
        assert [j["id"] for j in paged.jobs(limit=2)] == ids[::-1]  # newest first, across 2 pages
        assert [j["id"] for j in paged.jobs(status="queued", limit=1)] == ids[:0:-1]
        assert [d["id"] for d in paged.list_datasets(limit=2)] == [d["id"] for d in datasets[::-1]]
    assert len(stub.requests_to("GET", "/v1/jobs?")) == 2 + 2


def test_service_errors_carry_the_envelope(api_url: str, api_key: str, make_client: MakeClient) -> None:
    client = make_client(api_url, api_key)
    with pytest.raises(ApiError) as info:
        client.submit({"training": {"lr": -1.0}})
    err = info.value
    assert err.status == 422 and err.code == "validation_error" and "training.lr" in err.details
    assert str(err) == ("error 422 validation_error: dataset_id: Missing data for required field.; "
                        "training.lr: Must be greater than 0 and less than or equal to 100.")
    with pytest.raises(ApiError) as info:
        client.job("job_" + "0" * 24)
    assert (info.value.status, info.value.code) == (404, "not_found")
    with pytest.raises(ApiError) as info:
        make_client(api_url, "wrong-key").job("job_1")
    assert info.value.status == 401 and info.value.attempts == 1


def test_cli_upload_submit_status_cancel(api_url: str, api_key: str, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.setenv("STABLETRAIN_URL", api_url)  # configured by environment only
    monkeypatch.setenv("STABLETRAIN_API_KEY", api_key)
    corpus = tmp_path / "fox.txt"
    corpus.write_text(TEXT)
    res = run_cli("upload", str(corpus), "--name", "fox")
    assert res.rc == 0 and res.out.startswith("uploaded ds_") and "fox" in res.out, res
    res = run_cli("--json", "datasets")
    dataset_id = json.loads(res.out)[0]["id"]

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    res = run_cli("submit", str(spec), "--dataset", dataset_id, "--json")
    assert res.rc == 0, res
    job = json.loads(res.out)
    assert job["status"] == "queued" and job["dataset_id"] == dataset_id

    res = run_cli("status", job["id"])
    assert res.rc == 0 and job["id"] in res.out and "queued" in res.out and "step 0/10" in res.out
    res = run_cli("jobs", "--status", "queued")
    assert res.rc == 0 and res.out.count("job_") == 1
    res = run_cli("cancel", job["id"])
    assert res.rc == 0 and res.out.strip() == f"{job['id']} cancelled"
    res = run_cli("wait", job["id"], "--no-progress")
    assert res.rc == 4 and f"job {job['id']} cancelled" in res.out and "diagnosis" in res.out
    res = run_cli("cancel", job["id"])
    assert res.rc == 3 and res.err.strip() == f"error 409 conflict: Job {job['id']} is already cancelled."


def test_cli_one_line_errors(api_url: str, api_key: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STABLETRAIN_URL", api_url)
    monkeypatch.setenv("STABLETRAIN_API_KEY", api_key)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"training": {"lr": -1.0}}))
    res = run_cli("submit", str(spec), "--dataset", "ds_" + "0" * 24)
    assert res.rc == 3 and res.out == ""
    assert len(res.err.strip().splitlines()) == 1, res.err
    assert res.err.startswith("error 422 validation_error: training.lr: Must be greater than 0"), res.err

    spec.write_text("{not json")
    res = run_cli("submit", str(spec))
    assert res.rc == 2 and "invalid JSON at line 1" in res.err
    res = run_cli("submit", str(tmp_path / "missing.json"))
    assert res.rc == 2 and "missing.json" in res.err
    res = run_cli("upload", str(tmp_path / "missing.txt"))
    assert res.rc == 2 and "no such file" in res.err

    monkeypatch.delenv("STABLETRAIN_API_KEY")
    res = run_cli("status", "job_1")
    assert res.rc == 2 and res.err.startswith("error: no API key: set STABLETRAIN_API_KEY")
    res = run_cli("--url", "localhost:8000", "--key", "k", "status", "job_1")
    assert res.rc == 2 and "STABLETRAIN_URL must be an http(s) URL" in res.err
    res = run_cli("status", "job_1", "--key", "k", "--retries", "0", "--url", f"http://127.0.0.1:{free_port()}")
    assert res.rc == 3 and "cannot reach" in res.err and "Connection refused" in res.err


def test_command_installed_and_runs_as_a_process(tmp_path: Path) -> None:
    pyproject = (REPO / "clients" / "stabletrain" / "pyproject.toml").read_text()  # the client distribution
    assert '[project.scripts]\nstabletrain = "stabletrain.cli:main"' in pyproject
    env = {k: v for k, v in os.environ.items() if k not in ("STABLETRAIN_API_KEY", "STABLETRAIN_URL")}
    out = subprocess.run([sys.executable, "-m", "stabletrain", "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "exit codes:" in out.stdout and "130" in out.stdout
    out = subprocess.run([sys.executable, "-m", "stabletrain", "status", "job_1"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no API key" in out.stderr
    out = subprocess.run([sys.executable, "-m", "stabletrain", "frobnicate"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_cli_pause_wait_resume(api_url: str, api_key: str, monkeypatch: pytest.MonkeyPatch,
                               make_client: MakeClient) -> None:
    monkeypatch.setenv("STABLETRAIN_URL", api_url)
    monkeypatch.setenv("STABLETRAIN_API_KEY", api_key)
    client = make_client(api_url, api_key)
    job = client.submit(SPEC, dataset_id=client.upload_text(TEXT)["id"])
    res = run_cli("pause", job["id"])
    assert res.rc == 0 and res.out.strip() == f"{job['id']} paused at step 0/10", res
    res = run_cli("jobs", "--status", "paused")
    assert res.rc == 0 and job["id"] in res.out and "paused" in res.out
    res = run_cli("wait", job["id"], "--no-progress")  # a paused job does not move: wait returns
    assert res.rc == 5 and f"stabletrain resume {job['id']}" in res.out, res
    res = run_cli("resume", job["id"])
    assert res.rc == 0 and res.out.strip() == f"{job['id']} queued: continues from its newest checkpoint", res
    assert client.job(job["id"])["status"] == "queued"


def test_pause_and_resume_whose_answers_were_lost_are_retried(api_url: str, api_key: str,
                                                              make_client: MakeClient) -> None:
    direct = make_client(api_url, api_key)
    job = direct.submit(SPEC, dataset_id=direct.upload_text(TEXT)["id"])
    with Stub(upstream=api_url) as stub:
        stub.script("POST", f"/v1/jobs/{job['id']}/pause", FORWARD_504)
        stub.script("POST", f"/v1/jobs/{job['id']}/resume", FORWARD_504)
        client = make_client(stub.url, api_key)
        assert client.pause(job["id"])["status"] == "paused"  # the repeat finds it paused: 200
        assert client.resume(job["id"])["status"] == "queued"  # the repeat finds it queued: 200
    assert len(stub.requests_to("POST", f"/v1/jobs/{job['id']}/pause")) == 2
    assert [kind["kind"] for kind in direct.events(job["id"])] == ["paused", "requeued"]
