"""Sampling: seeded determinism, greedy reproduction, generation from a checkpoint file."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from worker.engine.config import ModelConfig, parse_spec, spec_to_dict
from worker.engine.models import build_model
from worker.engine.sampling import generate, sample_from_checkpoint
from worker.engine.tokenizers import ByteTokenizer, CharTokenizer

SEQ = 16


def _model(arch: str = "lstm", vocab: int = 256, **kw: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, n_layers=1, d_model=16, hidden=32, n_heads=2, **kw)
    return build_model(cfg, vocab, SEQ)


def test_same_seed_same_text() -> None:
    model, tok = _model(), ByteTokenizer()
    a = generate(model, tok, "hi", 40, temperature=1.0, top_k=None, seed=7, seq_len=SEQ, device="cpu")
    b = generate(model, tok, "hi", 40, temperature=1.0, top_k=None, seed=7, seq_len=SEQ, device="cpu")
    c = generate(model, tok, "hi", 40, temperature=1.0, top_k=None, seed=8, seq_len=SEQ, device="cpu")
    assert a == b
    assert a != c


def test_top_k_one_is_greedy_and_model_mode_restored() -> None:
    model, tok = _model("transformer"), ByteTokenizer()
    model.train()
    greedy = generate(model, tok, "abc", 30, temperature=0, seed=1, seq_len=SEQ)
    top1 = generate(model, tok, "abc", 30, temperature=0.8, top_k=1, seed=2, seq_len=SEQ)
    assert greedy == top1
    assert model.training


@pytest.mark.parametrize("arch", ["mlp", "gru", "transformer"])
def test_long_generation_crops_context_and_empty_prompt_works(arch: str) -> None:
    model, tok = _model(arch), ByteTokenizer()
    text = generate(model, tok, "", 3 * SEQ, temperature=1.0, top_k=5, seed=0, seq_len=SEQ)
    assert isinstance(text, str) and len(text) > 0


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny ops run faster on one thread, especially on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_greedy_reproduces_overfit_string() -> None:
    torch.manual_seed(0)
    tok = ByteTokenizer()
    text = "hello world! " * 8
    data = torch.tensor(tok.encode(text))
    model = _model("lstm")
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    windows = data.unfold(0, SEQ + 1, 3)  # windows at every phase of the 13-char period
    for _ in range(100):
        logits = model(windows[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = generate(model, tok, "hello", 26, temperature=0, seed=0, seq_len=SEQ)
    assert out == " world! hello world! hello"


def _save(path: Path, spec_raw: dict[str, Any], tokenizer: Any) -> torch.nn.Module:
    spec = parse_spec(spec_raw)
    torch.manual_seed(0)
    model = build_model(spec.model, tokenizer.vocab_size, spec.training.seq_len)
    state = {
        "format": "stabletrain-ckpt-v1",
        "spec": spec_to_dict(spec),
        "tokenizer": tokenizer.state_dict(),
        "model": model.state_dict(),
        "step": 0,
    }
    torch.save(state, path)
    return model


def test_sample_from_checkpoint_matches_in_memory(tmp_path: Path) -> None:
    raw = {"model": {"arch": "transformer", "n_layers": 1, "d_model": 16, "n_heads": 2,
                     "norm": "layernorm", "tie_embeddings": True},
           "training": {"seq_len": SEQ}}
    tok = ByteTokenizer()
    model = _save(tmp_path / "ckpt.pt", raw, tok)
    expected = generate(model, tok, "训练", 20, temperature=0.9, top_k=20, seed=3, seq_len=SEQ)
    got = sample_from_checkpoint(tmp_path / "ckpt.pt", "训练", max_new_tokens=20, temperature=0.9, top_k=20, seed=3)
    assert got == expected


def test_sample_from_char_checkpoint_with_empty_and_unknown_prompt(tmp_path: Path) -> None:
    raw = {"model": {"arch": "lstm", "n_layers": 1, "d_model": 8, "hidden": 8, "forget_bias": 1.0},
           "tokenizer": {"kind": "char"}, "training": {"seq_len": SEQ}}
    tok = CharTokenizer.from_text("ab cd\nef")
    _save(tmp_path / "c.pt", raw, tok)
    for prompt in ("", "zz?"):
        out = sample_from_checkpoint(tmp_path / "c.pt", prompt, max_new_tokens=10, seed=0)
        assert len(out) == 10


def test_a_checkpoint_from_before_hidden_set_the_ffn_width_still_samples(tmp_path: Path) -> None:
    # Such a checkpoint's spec says hidden 128 and has no depth_scaled_init, but its FFN is 4 * d_model.
    raw = {"model": {"arch": "transformer", "n_layers": 1, "d_model": 16, "n_heads": 2, "norm": "layernorm",
                     "hidden": 64}, "training": {"seq_len": SEQ}}
    tok = ByteTokenizer()
    _save(tmp_path / "ckpt.pt", raw, tok)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state["spec"]["model"]["hidden"] = 128
    del state["spec"]["model"]["depth_scaled_init"]
    torch.save(state, tmp_path / "legacy.pt")
    assert sample_from_checkpoint(tmp_path / "legacy.pt", "ab", max_new_tokens=5, seed=1) == \
        sample_from_checkpoint(tmp_path / "ckpt.pt", "ab", max_new_tokens=5, seed=1)
