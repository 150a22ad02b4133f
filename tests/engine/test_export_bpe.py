"""BPE tokenizer: trained on the corpus, cached by (text sha256, settings), saved in checkpoints,
used by sampling and by the Hugging Face export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stabletrain_export.hf import write_hf_dir
from tests.engine.spec_helpers import corpus, merge
from tests.export_helpers import GPT2_SPEC, assert_hf_matches, write_checkpoint
from worker.engine.checkpoint import load_checkpoint
from worker.engine.config import SpecError, TokenizerConfig, parse_spec
from worker.engine.sampling import load_model_file, sample_from_checkpoint
from worker.engine.tokenizers import (
    BpeTokenizer,
    bpe_cache_path,
    build_tokenizer,
    tokenizer_from_state,
    train_bpe,
)

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ("the quick brown fox", "中文文本，还有标点。", "emoji 🙂 and\ttabs\r\n  runs   of spaces", "\x00\x7f\u00ff")


@pytest.fixture(scope="module")
def bpe() -> BpeTokenizer:
    return build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=600), corpus(40_000))


def test_bpe_is_lossless_and_shorter_than_bytes(bpe: BpeTokenizer) -> None:
    assert 300 < bpe.vocab_size <= 600
    text = corpus(40_000)
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text and len(ids) < 0.6 * len(text.encode("utf-8"))
    for t in TEXTS:  # including characters the corpus never had
        assert bpe.decode(bpe.encode(t)) == t
    assert max(ids) < bpe.vocab_size and bpe.decode([bpe.vocab_size + 5]) == ""


def test_state_round_trip(bpe: BpeTokenizer) -> None:
    state = bpe.state_dict()
    assert set(state) == {"kind", "json"} and isinstance(state["json"], str)
    again = tokenizer_from_state(json.loads(json.dumps(state)))
    assert isinstance(again, BpeTokenizer) and again.vocab_size == bpe.vocab_size
    assert all(again.encode(t) == bpe.encode(t) for t in TEXTS)


def test_second_build_reads_the_cache(tmp_path: Path) -> None:
    text, cfg = corpus(20_000), TokenizerConfig(kind="bpe", vocab_size=400)
    first = build_tokenizer(cfg, text, cache_dir=tmp_path)
    path = bpe_cache_path(tmp_path, text, 400)
    assert path.read_text() == first.json
    # Plant a different (valid) tokenizer under the same key: a cache hit returns it, a retrain would not.
    planted = train_bpe("completely different text " * 50, 300)
    path.write_text(planted)
    assert build_tokenizer(cfg, text, cache_dir=tmp_path).json == planted
    # other settings or other text: another key
    assert build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=450), text, cache_dir=tmp_path).json != planted
    assert len(list(tmp_path.glob("bpe-*.json"))) == 2
    # a damaged file is trained again and replaced
    path.write_text("{not json")
    assert build_tokenizer(cfg, text, cache_dir=tmp_path).json == first.json == path.read_text()


def test_vocab_size_bounds() -> None:
    for bad in (256, 65537, "512"):
        with pytest.raises(SpecError) as err:
            parse_spec({"tokenizer": {"kind": "bpe", "vocab_size": bad}})
        assert err.value.path == "tokenizer.vocab_size"
    assert parse_spec({"tokenizer": {"kind": "bpe", "vocab_size": 257}}).tokenizer.vocab_size == 257


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_export_with_bpe(tmp_path: Path, bpe: BpeTokenizer, tied: bool) -> None:
    raw = merge(GPT2_SPEC, {"model": {"tie_embeddings": tied}, "tokenizer": {"kind": "bpe", "vocab_size": 600}})
    model, tokenizer = write_checkpoint(tmp_path / "c.pt", raw, tokenizer=bpe)
    folder = write_hf_dir(tmp_path / "c.pt", tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == bpe.vocab_size
    for prompt in ("The quick brown", "中文 and 🙂"):
        assert_hf_matches(folder, model, tokenizer, prompt, new_tokens=12)


def test_train_checkpoint_sample_and_resume_with_bpe(tmp_path: Path) -> None:
    spec = merge(GPT2_SPEC, {"tokenizer": {"kind": "bpe", "vocab_size": 512},
                             "training": {"max_steps": 6, "batch_size": 4, "seq_len": 32, "eval_every": 1000},
                             "checkpointing": {"every_steps": 3}})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "data.txt").write_text(corpus(20_000))
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "STABLETRAIN_TOKENIZER_CACHE": str(tmp_path / "tok")}
    train = [sys.executable, "-m", "worker.engine", "train", "spec.json", "--data", "data.txt", "--out", "run"]
    proc = subprocess.run(train, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    cached = list((tmp_path / "tok").glob("bpe-*-512-*.json"))
    assert len(cached) == 1
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_6.pt")
    assert ckpt["tokenizer"] == {"kind": "bpe", "json": cached[0].read_text()}
    _, model, tokenizer = load_model_file(tmp_path / "run" / "checkpoints" / "step_6.pt")
    assert isinstance(tokenizer, BpeTokenizer) and model.tok_emb.num_embeddings == tokenizer.vocab_size
    text = sample_from_checkpoint(tmp_path / "run" / "checkpoints" / "step_6.pt", "The ", 20, temperature=0.8)
    assert len(text) > 20, "20 BPE ids decode to more than 20 characters (merged tokens)"
    # resuming keeps the checkpoint's tokenizer even when the cache is gone
    cached[0].unlink()
    spec["training"]["max_steps"] = 9
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    resume = [*train, "--resume", str(tmp_path / "run" / "checkpoints" / "step_6.pt")]
    proc = subprocess.run(resume, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "step_9.pt")["tokenizer"] == ckpt["tokenizer"]
    assert not list((tmp_path / "tok").glob("bpe-*.json")), "a resumed run does not train a tokenizer"
