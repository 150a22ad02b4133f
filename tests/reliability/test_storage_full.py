"""Fault 4: the checkpoint storage fills up in the middle of a run (a tmpfs we fill).

The write of a checkpoint then fails part-way. Never may a partial checkpoint be
listed or served: no record and no file for the failed step, no temp file left
behind, every listed checkpoint downloads whole. The job records the reason
(a `checkpoint_failed` event) and either goes on with its previous checkpoints
(space comes back) or, when even its final checkpoint cannot be written, fails
with that reason instead of claiming a result it could not store.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.conftest import Cluster, need
from tests.reliability.helpers import (
    assert_checkpoints_served,
    checkpoints,
    download,
    events,
    get_job,
    job_spec,
    submit,
    upload,
    wait_status,
)
from worker.testing import wait_for

pytestmark = pytest.mark.integration


class Tmpfs:
    """A small tmpfs mounted on a folder; fill() leaves less room than one checkpoint."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                             capture_output=True, text=True)
        need(out.returncode == 0, f"cannot mount a tmpfs (root needed): {out.stderr.strip()}")
        self.filler = path / ".filler"

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave_bytes: int) -> None:
        with open(self.filler, "ab") as fh:
            fh.write(b"\0" * max(0, self.free_bytes() - leave_bytes))

    def empty(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def full_storage(make_cluster: Any) -> Iterator[tuple[Cluster, Tmpfs]]:
    cluster: Cluster = make_cluster()
    fs = Tmpfs(cluster.root / "storage" / "checkpoints", size_mb=16)
    try:
        cluster.start_worker("w1")
        yield cluster, fs
    finally:
        cluster.stop_worker(signal.SIGKILL)
        fs.unmount()


def failed_steps(cluster: Cluster, job_id: str) -> list[int]:
    return [e["step"] for e in events(cluster, job_id) if e["kind"] == "checkpoint_failed"]


def assert_nothing_partial(cluster: Cluster, fs: Tmpfs, job_id: str) -> None:
    """No record, file or temp file of a failed checkpoint; every listed one downloads whole."""
    failed = failed_steps(cluster, job_id)
    listed = {c["step"] for c in assert_checkpoints_served(cluster, job_id)}
    assert not listed & set(failed), (listed, failed)
    folder = fs.path / job_id
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    assert all(n.startswith("step_") and n.endswith(".pt") for n in names), names
    assert {int(n[5:-3]) for n in names} == listed, (names, listed)
    for step in failed:
        assert download(cluster, job_id, step)[0] == 404


def test_storage_full_mid_checkpoint_never_lists_a_partial_one(full_storage: tuple[Cluster, Tmpfs],
                                                               corpus: bytes) -> None:
    cluster, fs = full_storage
    dataset_id = upload(cluster, corpus)

    # 1. space comes back: the job keeps its earlier checkpoints, goes on and succeeds
    job_id = submit(cluster, dataset_id, spec=job_spec(600, 50, keep_last=3))
    first = wait_for(lambda: checkpoints(cluster, job_id), 60, "a first checkpoint")[0]
    fs.fill(leave_bytes=first["bytes"] // 2)  # the next checkpoint is written half-way, then ENOSPC
    wait_for(lambda: failed_steps(cluster, job_id), 60, "a checkpoint_failed event")
    fs.empty()  # space comes back at once (before the job reaches its end); what failed stays failed
    assert_nothing_partial(cluster, fs, job_id)
    job = wait_status(cluster, job_id, {"succeeded"}, 60)
    failed = [e for e in events(cluster, job_id) if e["kind"] == "checkpoint_failed"]
    assert failed and all("No space left on device" in e["message"] for e in failed), failed
    assert_nothing_partial(cluster, fs, job_id)
    assert checkpoints(cluster, job_id)[-1]["step"] == job["progress"]["step"] == 600

    # 2. it stays full to the end: the final checkpoint cannot be written, the job fails saying why
    job_id = submit(cluster, dataset_id, spec=job_spec(300, 50, keep_last=3))
    first = wait_for(lambda: checkpoints(cluster, job_id), 60, "a first checkpoint")[0]
    fs.fill(leave_bytes=first["bytes"] // 2)
    job = wait_status(cluster, job_id, {"failed"}, 60)
    assert "checkpoint" in job["error"] and "No space left on device" in job["error"], job["error"]
    assert get_job(cluster, job_id)["progress"]["step"] == 300
    assert_nothing_partial(cluster, fs, job_id)
    assert checkpoints(cluster, job_id), "the checkpoints written before the disk filled are kept"
    fs.empty()
