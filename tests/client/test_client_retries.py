"""Retry, idempotency and error handling of the client against a local stub HTTP server.

The stub answers like a gateway in front of the service would (503, 429 with Retry-After, dropped
connections); the requests are real HTTP over a socket.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from stabletrain import ApiError, Client, ConfigError, ConnectionFailed
from stabletrain.client import DEFAULT_URL, _retry_after_s
from tests.client.servers import DROP, Reply, Stub, free_port

MakeClient = Callable[..., Client]
QUEUED = {"id": "job_1", "status": "queued", "progress": {"step": 0, "max_steps": 10}}


def test_submit_retries_503_with_one_idempotency_key(make_client: MakeClient) -> None:
    with Stub() as stub:
        stub.script("POST", "/v1/jobs", Reply(503), Reply(503), Reply(202, QUEUED))
        client = make_client(stub.url, "k")
        job = client.submit({"training": {"max_steps": 10}}, dataset_id="ds_1")
    assert job["id"] == "job_1"
    posts = stub.requests_to("POST", "/v1/jobs")
    assert len(posts) == 3 and len(client.slept) == 2
    keys = {p.headers["Idempotency-Key"] for p in posts}
    assert len(keys) == 1 and uuid.UUID(keys.pop()).version == 4
    assert all(p.headers["Authorization"] == "Bearer k" for p in posts)
    assert b'"dataset_id": "ds_1"' in posts[0].body


def test_submit_uses_the_given_idempotency_key(make_client: MakeClient) -> None:
    with Stub() as stub:
        stub.script("POST", "/v1/jobs", Reply(202, QUEUED))
        make_client(stub.url, "k").submit({}, idempotency_key="mine-1")
    assert stub.requests_to("POST", "/v1/jobs")[0].headers["Idempotency-Key"] == "mine-1"


def test_backoff_grows_exponentially_with_jitter(make_client: MakeClient) -> None:
    with Stub() as stub:
        stub.script("GET", "/v1/jobs/job_1", *[Reply(503)] * 4, Reply(200, QUEUED))
        client = make_client(stub.url, "k", backoff=1.0, max_backoff=4.0)
        client.job("job_1")
    caps = [1.0, 2.0, 4.0, 4.0]
    assert len(client.slept) == 4
    for slept, cap in zip(client.slept, caps, strict=True):
        assert cap / 2 <= slept <= cap


def test_429_waits_for_retry_after(make_client: MakeClient) -> None:
    with Stub() as stub:
        stub.script("GET", "/v1/jobs/job_1", Reply(429, headers={"Retry-After": "7"}), Reply(200, QUEUED))
        client = make_client(stub.url, "k")
        assert client.job("job_1")["id"] == "job_1"
    assert len(client.slept) == 1 and 7 <= client.slept[0] < 7.1


def test_429_retry_after_really_waits(make_client: MakeClient) -> None:
    with Stub() as stub:
        stub.script("GET", "/v1/jobs/job_1", Reply(429, headers={"Retry-After": "1"}), Reply(200, QUEUED))
        client = make_client(stub.url, "k")
        client._sleep = time.sleep
        started = time.monotonic()
        client.job("job_1")
    assert time.monotonic() - started >= 1.0


def test_retry_after_beyond_the_limit_is_not_waited_for(make_client: MakeClient) -> None:
    with Stub() as stub:
        stub.script("GET", "/v1/jobs/job_1", Reply(429, headers={"Retry-After": "3600"}))
        client = make_client(stub.url, "k", max_retry_after=60)
        with pytest.raises(ApiError) as info:
            client.job("job_1")
    assert info.value.status == 429 and info.value.code == "rate_limited"
    assert client.slept == [] and len(stub.seen) == 1


def test_retry_after_http_date() -> None:
    assert _retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert _retry_after_s("12") == 12.0 and _retry_after_s("soon") is None and _retry_after_s(None) is None


@pytest.mark.parametrize("status", [502, 503, 504])
def test_gateway_errors_retried_then_raised(make_client: MakeClient, status: int) -> None:
    with Stub() as stub:
        stub.script("GET", "/v1/jobs/job_1", *[Reply(status)] * 10)
        client = make_client(stub.url, "k", retries=3)
        with pytest.raises(ApiError) as info:
            client.job("job_1")
    assert info.value.status == status and info.value.attempts == 4
    assert len(stub.seen) == 4 and len(client.slept) == 3


@pytest.mark.parametrize("status", [400, 401, 404, 409, 413, 422, 500])
def test_other_errors_are_not_retried(make_client: MakeClient, status: int) -> None:
    with Stub() as stub:
        stub.script("GET", "/v1/jobs/job_1", Reply(status))
        client = make_client(stub.url, "k")
        with pytest.raises(ApiError) as info:
            client.job("job_1")
    assert info.value.status == status and len(stub.seen) == 1 and client.slept == []


def test_dropped_connections_retried_for_gets(make_client: MakeClient) -> None:
    with Stub() as stub:
        stub.script("GET", "/v1/jobs/job_1", DROP, DROP, Reply(200, QUEUED))
        client = make_client(stub.url, "k")
        assert client.job("job_1")["status"] == "queued"
    assert len(stub.seen) == 3 and len(client.slept) == 2


def test_connection_refused_retried_then_reported(make_client: MakeClient) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = make_client(url, "k", retries=3)
    with pytest.raises(ConnectionFailed, match="cannot reach .*Connection refused"):
        client.job("job_1")
    assert len(client.slept) == 3


def test_upload_retried_when_nothing_was_stored(make_client: MakeClient) -> None:
    created = {"id": "ds_1", "name": "c", "bytes": 5, "sha256": "x"}
    with Stub() as stub:
        stub.script("POST", "/v1/datasets", Reply(503), Reply(429, headers={"Retry-After": "0"}),
                    Reply(201, created))
        client = make_client(stub.url, "k")
        assert client.upload(b"hello", name="c")["id"] == "ds_1"
    posts = stub.requests_to("POST", "/v1/datasets")
    assert [p.body for p in posts] == [b"hello"] * 3  # the body is re-sent whole each time
    assert posts[0].path == "/v1/datasets?name=c" and posts[0].headers["Content-Type"].startswith("text/plain")


def test_upload_of_a_file_is_resent_from_its_start(make_client: MakeClient, tmp_path: Any) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"abc " * 1000)
    with Stub() as stub:
        stub.script("POST", "/v1/datasets", Reply(503), Reply(201, {"id": "ds_1"}))
        make_client(stub.url, "k").upload(path)
    posts = stub.requests_to("POST", "/v1/datasets")
    assert [len(p.body) for p in posts] == [4000, 4000] and posts[1].path == "/v1/datasets?name=corpus.txt"


@pytest.mark.parametrize("answer", [DROP, Reply(502), Reply(504), Reply(500)])
def test_upload_not_retried_when_the_server_may_have_stored_it(make_client: MakeClient, answer: Any) -> None:
    with Stub() as stub:
        stub.script("POST", "/v1/datasets", answer, Reply(201, {"id": "ds_2"}))
        client = make_client(stub.url, "k")
        with pytest.raises((ApiError, ConnectionFailed)):
            client.upload(b"hello")
    assert len(stub.seen) == 1 and client.slept == []


def test_upload_retried_when_the_connection_was_never_made(make_client: MakeClient) -> None:
    client = make_client(f"http://127.0.0.1:{free_port()}", "k", retries=2)
    with pytest.raises(ConnectionFailed, match="Connection refused"):
        client.upload(b"hello")
    assert len(client.slept) == 2


def test_sample_202_is_polled_until_done(make_client: MakeClient) -> None:
    queued = {"id": "smp_1", "job_id": "job_1", "status": "queued", "text": None}
    with Stub() as stub:
        stub.script("POST", "/v1/jobs/job_1/samples", Reply(202, queued))
        stub.script("GET", "/v1/jobs/job_1/samples/smp_1", Reply(200, {**queued, "status": "running"}),
                    Reply(200, {**queued, "status": "succeeded", "text": "The end"}))
        client = make_client(stub.url, "k")
        sample = client.sample("job_1", "The ", max_new_tokens=5, top_k=None, wait=0)
    assert sample["text"] == "The end"
    post = stub.requests_to("POST", "/v1/jobs/job_1/samples")[0]
    assert post.path == "/v1/jobs/job_1/samples?wait=0" and post.body == b'{"prompt": "The ", "max_new_tokens": 5}'
    assert len(stub.requests_to("GET", "/v1/jobs/job_1/samples/smp_1")) == 2


def test_sample_post_not_retried_on_a_dropped_connection(make_client: MakeClient) -> None:
    with Stub() as stub:
        stub.script("POST", "/v1/jobs/job_1/samples", DROP)
        client = make_client(stub.url, "k")
        with pytest.raises(ConnectionFailed, match="not retried"):
            client.sample("job_1", "x")
    assert len(stub.seen) == 1


def test_retried_cancel_that_meets_409_cancelled_returns_the_job(make_client: MakeClient) -> None:
    conflict = {"error": {"code": "conflict", "message": "Job job_1 is already cancelled.",
                          "details": {"status": "cancelled"}}}
    with Stub() as stub:
        stub.script("POST", "/v1/jobs/job_1/cancel", Reply(503), Reply(409, conflict))
        stub.script("GET", "/v1/jobs/job_1", Reply(200, {**QUEUED, "status": "cancelled"}))
        client = make_client(stub.url, "k")
        assert client.cancel("job_1")["status"] == "cancelled"
        stub.script("POST", "/v1/jobs/job_1/cancel", Reply(409, conflict))
        with pytest.raises(ApiError, match="already cancelled"):  # not retried: a real conflict
            client.cancel("job_1")


def test_api_error_formats_field_paths() -> None:
    err = ApiError(422, "validation_error", "Validation failed.", {"training.lr": ["must be > 0"]})
    assert str(err) == "error 422 validation_error: training.lr: must be > 0"
    err = ApiError(409, "conflict", "Job job_1 is already failed.", {"status": "failed"})
    assert str(err) == "error 409 conflict: Job job_1 is already failed."


def test_non_json_error_bodies(make_client: MakeClient) -> None:
    with Stub() as stub:
        stub.script("GET", "/v1/jobs/job_1", Reply(500, b"<html>\nInternal Server Error</html>"))
        with pytest.raises(ApiError) as info:
            make_client(stub.url, "k").job("job_1")
    assert info.value.code == "http_500" and info.value.message == "<html>"


def test_configuration_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STABLETRAIN_URL", raising=False)
    monkeypatch.delenv("STABLETRAIN_API_KEY", raising=False)
    with Client() as client:
        assert client.url == DEFAULT_URL and client.key is None
        with pytest.raises(ConfigError, match="STABLETRAIN_API_KEY"):
            client.job("job_1")  # before any request
    monkeypatch.setenv("STABLETRAIN_URL", "http://example.invalid:9/")
    monkeypatch.setenv("STABLETRAIN_API_KEY", " secret ")
    with Client() as client:
        assert client.url == "http://example.invalid:9" and client.key == "secret"
    with Client(url="http://other:1", key="k2") as client:
        assert (client.url, client.key) == ("http://other:1", "k2")
    monkeypatch.setenv("STABLETRAIN_URL", "localhost:8000")
    with pytest.raises(ConfigError, match="http"):
        Client()


def test_wait_rides_out_a_service_outage(make_client: MakeClient) -> None:
    running = {**QUEUED, "status": "running", "progress": {"step": 3, "max_steps": 10}}
    done = {**QUEUED, "status": "succeeded", "progress": {"step": 10, "max_steps": 10}}
    with Stub() as stub:
        stub.script("GET", "/v1/jobs/job_1", Reply(200, running), Reply(503), DROP, Reply(502),
                    Reply(200, done))
        client = make_client(stub.url, "k", retries=0)
        seen: list[int] = []
        final = client.wait("job_1", on_progress=lambda j: seen.append(j["progress"]["step"]), poll_s=0.01)
        assert final["status"] == "succeeded" and seen == [3, 10]
        stub.script("GET", "/v1/jobs/job_1", Reply(404))
        with pytest.raises(ApiError, match="404"):  # not an outage: raised at once
            client.wait("job_1")
        stub.script("GET", "/v1/jobs/job_1", *[Reply(503)] * 3)
        with pytest.raises(ApiError, match="503"):
            client.wait("job_1", outage_s=0)
