"""`stabletrain retry --apply --wait` end to end: HTTP API + a real Celery worker process. An RNN
that explodes is retried with its recommendations and trains to the end."""

from __future__ import annotations

import json

import pytest

from tests.client.conftest import CORPUS, Live
from tests.client.test_client_live import EXPLODING, write_spec

pytestmark = pytest.mark.integration


def test_retry_of_an_exploding_rnn_succeeds(live: Live, tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("client-retry")
    dataset_id = json.loads(live.cli("--json", "upload", str(CORPUS)).out)["id"]
    res = live.cli("submit", write_spec(tmp, EXPLODING), "--dataset", dataset_id, "--wait", "--no-progress",
                   "--poll", "0.2")
    assert res.rc == 1 and "exploding" in res.out, f"{res}\n{live.stack.log_tail()}"
    parent_id = res.out.split()[1]

    res = live.cli("retry", parent_id, "--apply", "--set", "training.max_steps=40", "--wait", "--no-progress",
                   "--poll", "0.2")
    assert res.rc == 0, f"{res}\n{live.stack.log_tail()}"
    lines = res.out.splitlines()
    assert lines[0].startswith(f"retried {parent_id} as job_") and lines[0].endswith("(queued)")
    child_id = lines[0].split()[3]
    patch = {line.split()[0]: line.split()[-1] for line in lines[1:] if line.startswith("  ")
             and "=" in line.split()[:2]}
    assert patch["stabilization.clip"] == "(nonfinite)" and patch["training.lr"] == "(nonfinite)"
    assert patch["training.max_steps"] == "(override)"
    assert f"job {child_id} succeeded at step 40/40" in res.out
    child = live.client().job(child_id)
    assert child["parent_id"] == parent_id and child["spec"]["stabilization"]["clip"]["mode"] == "norm"
    assert live.client().job(parent_id)["children"] == [child_id]
