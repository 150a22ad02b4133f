"""Data-parallel training on CPU: 2 gloo ranks against the single-process run, resume, and a rank's death.

Each 2-rank run spawns two processes that import torch (~10 s on two shared cores), so the runs are
few and tiny: a one-layer LSTM, 8-row global batches, a dozen or twenty steps.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from worker.engine.checkpoint import load_checkpoint
from worker.engine.config import SpecError
from worker.engine.distributed import RANK_PROCESS_PREFIX, RankFailed, _Run, run_data_parallel
from worker.engine.trainer import Trainer

from .spec_helpers import BASE, CORPUS, Recorder, corpus, merge, spec

# A float32 all-reduce sums the two ranks' gradients in another order than one process's batch mean
# (and divides the sum by 2 afterwards): each step differs by ~1 ulp relative (~1e-7), measured up to
# 2e-7 over these 20 steps. Adam feeds such differences back into the weights, where they may grow by
# a few orders of magnitude over a run, not by three in 20 steps of a smooth model: 1e-4 leaves room
# for that and still catches any real difference (a wrong shard or a missed all-reduce moves the loss
# by 1e-2 or more from the first steps on).
LOSS_RTOL = 1e-4


def ranks_alive() -> list[Any]:
    return [p for p in multiprocessing.active_children() if p.name.startswith(RANK_PROCESS_PREFIX)]


def test_two_ranks_follow_the_single_process_loss_curve(tmp_path: Path) -> None:
    # grad accumulation exercises no_sync on the first micro-batch; clipping sees the synchronized norm
    over = {"training": {"max_steps": 20, "grad_accum_steps": 2}, "monitoring": {"layer_stats_every": 5}}
    single = Recorder()
    one = Trainer(spec(**over), corpus(), tmp_path / "one", single).run()
    ddp = Recorder()
    two = run_data_parallel(spec(**over, resources={"devices": 2}), corpus(), tmp_path / "two", ddp)

    assert (one.status, two.status) == ("succeeded", "succeeded")
    assert [r["step"] for r in ddp.rows] == list(range(1, 21))  # rank 0 alone reports, each step once
    for a, b in zip(single.rows, ddp.rows, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=LOSS_RTOL), (a["step"], a["loss"], b["loss"])
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=LOSS_RTOL), a["step"]
        assert a["tokens_seen"] == b["tokens_seen"]  # the global batch's tokens
    assert ddp.rows[0]["loss"] != ddp.rows[-1]["loss"]
    assert ddp.kinds().count("started") == 1 and ddp.kinds()[-1] == "finished"
    assert sorted({row["step"] for row in ddp.layers}) == [5, 10, 15, 20]
    assert [c["step"] for c in ddp.checkpoints] == [20] and Path(ddp.checkpoints[0]["path"]).is_file()
    assert not ranks_alive()


class KillRankAt(Recorder):
    """Kills rank 1 (as the OOM killer would) once the checkpoint of `step` is recorded."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.kill_step = step

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        super().on_checkpoint(info)
        if info["step"] == self.kill_step:
            rank1 = next(p for p in ranks_alive() if p.name == f"{RANK_PROCESS_PREFIX}1")
            os.kill(rank1.pid, signal.SIGKILL)


def test_a_killed_rank_stops_the_whole_run_and_resume_is_bit_exact(tmp_path: Path) -> None:
    # dropout draws from each rank's own stream: the checkpoint must carry every rank's state
    s = spec(model={"dropout": 0.1}, training={"max_steps": 12},
             checkpointing={"every_steps": 4, "keep_last": 5}, resources={"devices": 2})
    full = run_data_parallel(s, corpus(), tmp_path / "full", Recorder())
    assert full.status == "succeeded" and full.step == 12

    killer = KillRankAt(4)
    with pytest.raises(RankFailed, match="rank 1 of 2 was killed by SIGKILL"):
        run_data_parallel(s, corpus(), tmp_path / "cut", killer)
    assert not ranks_alive()  # rank 0 was stopped too: no half of the job goes on
    assert max(r["step"] for r in killer.rows) < 12

    resumed = Recorder()
    end = run_data_parallel(s, corpus(), tmp_path / "cut", resumed, resume_from=tmp_path / "cut" / "step_4.pt")
    assert end.status == "succeeded" and resumed.rows[0]["step"] == 5 and resumed.kinds()[0] == "resumed"
    a = load_checkpoint(Path(full.checkpoint["path"]))
    b = load_checkpoint(Path(end.checkpoint["path"]))
    assert a["step"] == b["step"] == 12
    assert a["model"].keys() == b["model"].keys()
    for name, weight in a["model"].items():
        assert torch.equal(weight, b["model"][name]), name
    assert torch.equal(a["rng"]["ranks"][1]["torch"], b["rng"]["ranks"][1]["torch"])


class ExitedRank:
    """What _Run reads of a rank process that has already exited."""

    def __init__(self, exitcode: int) -> None:
        self.exitcode = exitcode


@pytest.mark.parametrize("seen_first", [0, 1])
def test_a_killed_rank_is_named_before_the_peer_that_aborted_because_of_it(seen_first: int) -> None:
    # gloo throws in rank 0's thread once rank 1 is gone, and std::terminate aborts rank 0; both exits
    # may be seen in the same poll, in either order: the failure names the kill, not the abort
    run = _Run([(ExitedRank(-signal.SIGABRT), None), (ExitedRank(-signal.SIGKILL), None)])
    run.exit_order = [seen_first, 1 - seen_first]
    assert str(run.failure()).startswith("rank 1 of 2 was killed by SIGKILL")


def test_of_two_killed_ranks_the_one_seen_first_is_named() -> None:
    run = _Run([(ExitedRank(-signal.SIGKILL), None), (ExitedRank(-signal.SIGTERM), None)])
    run.exit_order = [1, 0]
    assert str(run.failure()).startswith("rank 1 of 2 was killed by SIGTERM")


def test_rank_zero_errors_reach_the_caller_and_no_rank_is_left(tmp_path: Path) -> None:
    s = spec(model={"arch": "gru"}, stabilization={"precision": "fp16"}, resources={"devices": 2})
    with pytest.raises(ValueError, match="fp16 recurrent layers need a GPU"):
        run_data_parallel(s, corpus(), tmp_path / "x", Recorder())
    assert not ranks_alive()


def test_more_gpus_than_present_is_refused_before_any_rank_starts(tmp_path: Path) -> None:
    available = torch.cuda.device_count()
    s = spec(resources={"devices": available + 1} if available + 1 > 1 else {"devices": 2})
    with pytest.raises(ValueError, match=f"this worker has {available}"):
        run_data_parallel(s, corpus(), tmp_path / "x", Recorder(), device_type="cuda")
    assert not ranks_alive()


@pytest.mark.parametrize(("over", "path", "words"), [
    ({"training": {"batch_size": 6}, "resources": {"devices": 4}}, "training.batch_size", "divisible"),
    ({"model": {"arch": "mlp", "norm": "batchnorm"}, "resources": {"devices": 2}}, "model.norm", "each device"),
    ({"resources": {"devices": 0}}, "resources.devices", "between 1 and 64"),
    ({"resources": {"devices": 65}}, "resources.devices", "between 1 and 64"),
])
def test_specs_data_parallelism_cannot_honour_are_refused(over: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(SpecError) as caught:
        spec(**over)
    assert caught.value.path == path and words in caught.value.message


def test_one_device_is_the_default_and_batchnorm_stays_allowed_there() -> None:
    assert spec().resources.devices == 1
    assert spec(model={"arch": "mlp", "norm": "batchnorm"}, training={"batch_size": 7}).resources.devices == 1


class StopAfterSteps(Recorder):
    """Asks to stop before step `steps + 1` (should_stop is polled once before each step)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.polls, self.steps = 0, steps

    def should_stop(self) -> bool:
        self.polls += 1
        return self.polls > self.steps


def test_a_stop_heard_by_rank_zero_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    # only rank 0 polls should_stop (the worker's cancel and shutdown flags): the ranks must agree on it,
    # or rank 1 would wait in its next step's all-reduce until the collective timeout
    stopper = StopAfterSteps(6)
    result = run_data_parallel(spec(resources={"devices": 2}), corpus(), tmp_path / "stop", stopper,
                               collective_timeout_s=60)
    assert (result.status, result.step) == ("cancelled", 6)
    assert [r["step"] for r in stopper.rows] == list(range(1, 7))
    assert stopper.kinds()[-1] == "cancelled" and [c["step"] for c in stopper.checkpoints] == [6]
    saved = load_checkpoint(tmp_path / "stop" / "step_6.pt")
    assert saved["step"] == 6 and len(saved["rng"]["ranks"]) == 2
    assert not ranks_alive()


class PauseAfterSteps(Recorder):
    """Asks to pause before step `steps + 1` (should_pause is polled once before each step)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.polls, self.steps = 0, steps

    def should_pause(self) -> bool:
        self.polls += 1
        return self.polls > self.steps


def test_a_pause_heard_by_rank_zero_pauses_every_rank_with_one_checkpoint(tmp_path: Path) -> None:
    # like a stop, the pause request reaches rank 0 only; every rank must take part in the checkpoint's
    # gathering of random states and then end, else rank 1 would hang in its next collective
    pauser = PauseAfterSteps(5)
    s = spec(training={"max_steps": 12}, checkpointing={"every_steps": 5}, resources={"devices": 2})
    result = run_data_parallel(s, corpus(), tmp_path / "pause", pauser, collective_timeout_s=60)
    assert (result.status, result.step) == ("paused", 5)
    assert [c["step"] for c in pauser.checkpoints] == [5]  # the step-5 checkpoint serves: no second write
    pauser7 = PauseAfterSteps(7)
    result = run_data_parallel(s, corpus(), tmp_path / "pause7", pauser7, collective_timeout_s=60)
    assert (result.status, result.step) == ("paused", 7)
    assert [c["step"] for c in pauser7.checkpoints] == [5, 7] and pauser7.kinds()[-1] == "paused"
    assert len(load_checkpoint(tmp_path / "pause7" / "step_7.pt")["rng"]["ranks"]) == 2
    assert not ranks_alive()


def test_cli_trains_a_two_device_spec_with_one_set_of_records(tmp_path: Path) -> None:
    raw = merge(BASE, {"training": {"max_steps": 6}, "resources": {"devices": 2}})
    (tmp_path / "spec.json").write_text(json.dumps(raw))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "worker.engine", "train", str(tmp_path / "spec.json"),
                           "--data", str(CORPUS), "--out", str(out)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "succeeded after 6 steps" in done.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert (out / "checkpoints" / "step_6.pt").is_file()
