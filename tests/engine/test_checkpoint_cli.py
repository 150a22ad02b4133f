"""Checkpoint files and the command line."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stabletrain_storage import file_sha256
from worker.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

from .spec_helpers import BASE, CORPUS, merge

REPO = Path(__file__).resolve().parents[2]


def test_save_is_atomic_and_reports_the_file_sha256(tmp_path):
    path = tmp_path / "ck" / "step_3.pt"
    info = save_checkpoint(path, {"step": 3, "model": {"w": torch.ones(2)}})
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    assert info["bytes"] == path.stat().st_size
    assert [p.name for p in path.parent.iterdir()] == ["step_3.pt"]  # no temp file left behind
    state = torch.load(path, weights_only=True)
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "step_1.pt"

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", broken_fsync)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 1})
    assert list(tmp_path.iterdir()) == []


def test_foreign_or_corrupt_files_are_rejected(tmp_path):
    torch.save({"step": 1}, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a StableTrain checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt")


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.engine", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_train_writes_records_and_sample_prints_text(tmp_path):
    spec = merge(BASE, {"training": {"max_steps": 12, "eval_every": 6}, "checkpointing": {"every_steps": 6}})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    done = _cli("train", str(tmp_path / "spec.json"), "--data", str(CORPUS), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "succeeded after 12 steps" in done.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    assert all({"step", "loss", "grad_norm"} <= set(m) for m in metrics)
    layers = [json.loads(line) for line in (out / "layers.jsonl").read_text().splitlines()]
    assert {row["step"] for row in layers} == {5, 10}
    events = [json.loads(line)["kind"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[0] == "started" and events[-1] == "finished"
    diagnosis = json.loads((out / "diagnosis.json").read_text())
    assert diagnosis["status"] == "succeeded" and isinstance(diagnosis["findings"], list)
    ckpt = out / "checkpoints" / "step_12.pt"
    sample = _cli("sample", str(ckpt), "--prompt", "The ", "--max-new-tokens", "40", "--seed", "1")
    assert sample.returncode == 0, sample.stderr
    assert len(sample.stdout.strip()) > 0
    again = _cli("sample", str(ckpt), "--prompt", "The ", "--max-new-tokens", "40", "--seed", "1")
    assert again.stdout == sample.stdout


def test_cli_failed_run_exits_1_and_still_writes_the_diagnosis(tmp_path):
    spec = {"model": {"arch": "rnn", "activation": "relu", "d_model": 32, "hidden": 64, "init": "normal",
                      "init_std": 0.1},
            "training": {"max_steps": 60, "batch_size": 8, "seq_len": 32, "lr": 1.0, "optimizer": "sgd"},
            "stabilization": {"clip": {"mode": "none"}, "nonfinite": "stop"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    done = _cli("train", str(tmp_path / "spec.json"), "--data", str(CORPUS), "--out", str(tmp_path / "o"))
    assert done.returncode == 1
    diagnosis = json.loads((tmp_path / "o" / "diagnosis.json").read_text())
    assert diagnosis["status"] == "failed" and "non-finite" in diagnosis["error"]
    assert "nonfinite" in {f["kind"] for f in diagnosis["findings"]}
    assert diagnosis["health"] == "critical"  # the same health the API reports: worst severity


@pytest.mark.parametrize("spec, data, message", [
    ({"model": {"arch": "lstm", "wings": 2}}, "corpus", "model.wings: unknown field"),
    ({"training": {"lr": -1}}, "corpus", "training.lr: must be in (0, 100]"),
    ({}, "short", "corpus has"),
])
def test_cli_bad_input_exits_2_with_one_line(tmp_path, spec, data, message):
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    text = tmp_path / "data.txt"
    text.write_text("tiny" if data == "short" else CORPUS.read_text()[:5000])
    done = _cli("train", str(tmp_path / "spec.json"), "--data", str(text), "--out", str(tmp_path / "o"))
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
