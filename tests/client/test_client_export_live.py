"""`stabletrain download --format hf|safetensors` end to end: API + a real worker process writes the
export, the command fetches it, transformers and the engine load what came back."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.client.conftest import CORPUS, Live
from tests.export_helpers import assert_hf_matches, extract_tar
from worker.engine.sampling import load_model_file, sample_from_checkpoint

pytestmark = pytest.mark.integration

GPT2_TINY: dict[str, Any] = {
    "name": "client-tiny-gpt2",
    "model": {"arch": "transformer", "n_layers": 1, "d_model": 32, "n_heads": 4, "activation": "gelu",
              "norm": "layernorm", "tie_embeddings": True},
    "tokenizer": {"kind": "bpe", "vocab_size": 400},
    "training": {"max_steps": 8, "batch_size": 4, "seq_len": 32, "eval_every": 100},
    "checkpointing": {"every_steps": 100},
}


def _train(live: Live, tmp: Path, spec: dict[str, Any]) -> str:
    up = live.cli("--json", "upload", str(CORPUS), "--name", "corpus")
    assert up.rc == 0, up
    (tmp / "spec.json").write_text(json.dumps(spec))
    res = live.cli("submit", str(tmp / "spec.json"), "--dataset", json.loads(up.out)["id"], "--wait", "--poll", "0.2")
    assert res.rc == 0, res
    return next(line.split()[1] for line in res.err.splitlines() if line.startswith("submitted "))


def test_download_hf_and_safetensors(live: Live, tmp_path: Path) -> None:
    job_id = _train(live, tmp_path, GPT2_TINY)
    cache = live.stack.root / "storage" / "tokenizers"
    [cached] = cache.glob("bpe-*-400-*.json")
    stamp = cached.stat().st_mtime_ns
    # a second job of the same dataset and settings reads the stored tokenizer
    _train(live, tmp_path, {**GPT2_TINY, "name": "client-tiny-gpt2-again", "training": {
        **GPT2_TINY["training"], "max_steps": 2}})
    assert list(cache.glob("bpe-*.json")) == [cached] and cached.stat().st_mtime_ns == stamp
    res = live.cli("download", job_id, "-o", str(tmp_path / "ckpt.pt"))
    assert res.rc == 0, res
    res = live.cli("download", job_id, "--format", "hf", "-o", str(tmp_path))
    assert res.rc == 0, res
    archive = tmp_path / f"{job_id}_step_8.hf.tar.gz"
    with tarfile.open(archive) as tar:
        extract_tar(tar, tmp_path / "hf")
    _, model, tokenizer = load_model_file(tmp_path / "ckpt.pt")
    assert tokenizer.kind == "bpe" and tokenizer.state_dict()["json"] == cached.read_text()
    assert_hf_matches(tmp_path / "hf", model, tokenizer, "The ", new_tokens=16)

    res = live.cli("--json", "download", job_id, "--format", "safetensors", "-o", str(tmp_path / "w.safetensors"))
    assert res.rc == 0, res
    assert json.loads(res.out)["format"] == "safetensors"
    assert (sample_from_checkpoint(tmp_path / "w.safetensors", "The ", 30, temperature=0.8, seed=1)
            == sample_from_checkpoint(tmp_path / "ckpt.pt", "The ", 30, temperature=0.8, seed=1))


def test_download_hf_of_an_lstm_is_refused_naming_the_field(live: Live, tmp_path: Path) -> None:
    spec = {**GPT2_TINY, "name": "client-tiny-lstm-export",
            "model": {"arch": "lstm", "n_layers": 1, "d_model": 16, "hidden": 16}, "training": {
                **GPT2_TINY["training"], "max_steps": 2}}
    job_id = _train(live, tmp_path, spec)
    res = live.cli("download", job_id, "--format", "hf", "-o", str(tmp_path))
    assert res.rc == 3 and "model.arch" in res.err, res
    assert not list(tmp_path.glob("*.tar.gz")) and not list(tmp_path.glob(".*.part"))
