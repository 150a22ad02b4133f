"""Weights-only safetensors: the model's tensors and the engine config, enough to sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stabletrain_export.weights import WEIGHTS_FORMAT, ExportError, read_engine_state, write_weights
from tests.engine.spec_helpers import corpus, merge
from tests.export_helpers import GPT2_SPEC, write_checkpoint
from worker.engine.checkpoint import load_checkpoint
from worker.engine.sampling import sample_from_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _trained_checkpoint(tmp_path: Path, model: dict) -> Path:
    """A real run's last checkpoint (optimizer state and rollback copies included)."""
    spec = merge(GPT2_SPEC, {"model": model, "training": {"max_steps": 6, "batch_size": 4, "seq_len": 32,
                                                          "eval_every": 1000},
                             "stabilization": {"on_explosion": "rollback"}, "checkpointing": {"every_steps": 1000}})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "data.txt").write_text(corpus(4000))
    proc = subprocess.run([sys.executable, "-m", "worker.engine", "train", "spec.json", "--data", "data.txt",
                           "--out", "run"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "run" / "checkpoints" / "step_6.pt"


@pytest.mark.parametrize("model", [{"arch": "lstm", "hidden": 32, "activation": "tanh"}, {"tie_embeddings": True}], ids=["lstm", "tied"])
def test_weights_only_file_samples_like_the_checkpoint(tmp_path: Path, model: dict) -> None:
    ckpt = _trained_checkpoint(tmp_path, model)
    full = load_checkpoint(ckpt)
    assert "optimizer" in full
    out = write_weights(ckpt, tmp_path / "w.safetensors")
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
        keys = set(fh.keys())  # noqa: SIM118
    assert keys == set(full["model"]), "the model's tensors and nothing else"
    assert meta["stabletrain_format"] == WEIGHTS_FORMAT and json.loads(meta["spec"]) == full["spec"]
    assert json.loads(meta["tokenizer"]) == full["tokenizer"]
    assert out.stat().st_size < ckpt.stat().st_size
    state = read_engine_state(out)
    for key, value in full["model"].items():
        assert torch.equal(state["model"][key], value)
    for temperature in (0.0, 0.9):
        assert (sample_from_checkpoint(out, "The ", 40, temperature=temperature, seed=3)
                == sample_from_checkpoint(ckpt, "The ", 40, temperature=temperature, seed=3))
    cli = subprocess.run([sys.executable, "-m", "worker.engine", "sample", str(out), "--prompt", "The ",
                          "--max-new-tokens", "40", "--temperature", "0"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == sample_from_checkpoint(ckpt, "The ", 40, temperature=0) + "\n"


def test_engine_cli_writes_a_weights_file_of_any_arch(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "c.pt", merge(GPT2_SPEC, {"model": {"arch": "gru", "hidden": 16, "activation": "tanh"}}))
    proc = subprocess.run([sys.executable, "-m", "worker.engine", "export", str(tmp_path / "c.pt"), "--format",
                           "safetensors", "--out", str(tmp_path / "g.safetensors")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert read_engine_state(tmp_path / "g.safetensors")["spec"]["model"]["arch"] == "gru"


def test_foreign_safetensors_is_refused_with_exit_2(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ExportError, match="not a StableTrain weights file"):
        read_engine_state(tmp_path / "x.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    for name in ("x.safetensors", "junk.safetensors"):
        proc = subprocess.run([sys.executable, "-m", "worker.engine", "sample", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 2 and "cannot sample" in proc.stderr, proc.stderr
