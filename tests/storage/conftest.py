"""A real S3-compatible HTTP endpoint for storage tests: moto's server mode, started once per session.

`moto_endpoint` starts `moto_server` (from requirements-dev.txt) on a free port and polls it until it
answers; every test gets a fresh bucket (`bucket_url`). The AWS variables the server and boto3 read are
set for the session (moto accepts any credentials).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_serving(url: str, proc: subprocess.Popen[bytes], deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            requests.get(url, timeout=5)
            return
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.05)  # poll interval while the server binds its port
    raise RuntimeError(f"moto_server did not answer at {url} within {deadline_s} s")


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a moto S3 server for this session."""
    server = Path(sys.executable).parent / "moto_server"
    if not server.exists():
        pytest.fail(f"{server} is missing: pip install -r requirements-dev.txt (moto[server])")
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **AWS_ENV})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(url, proc, 60)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_client(moto_endpoint: str) -> Any:
    """A boto3 client of the test server (to look at the bucket from outside the code under test)."""
    import boto3

    return boto3.client("s3", endpoint_url=moto_endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"])


@pytest.fixture
def bucket(s3_client: Any) -> str:
    """A fresh, empty bucket."""
    name = f"st-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def bucket_url(bucket: str) -> str:
    """STORAGE_URL of the fresh bucket, with a prefix (keys live under it)."""
    return f"s3://{bucket}/stabletrain"
