"""Engine checkpoints for export tests, and what transformers makes of an exported folder."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import torch

from worker.engine.checkpoint import save_checkpoint
from worker.engine.config import parse_spec, spec_to_dict
from worker.engine.models import build_model
from worker.engine.sampling import generate
from worker.engine.tokenizers import AnyTokenizer, ByteTokenizer

GPT2_SPEC: dict[str, Any] = {
    "model": {"arch": "transformer", "n_layers": 2, "d_model": 32, "n_heads": 4, "activation": "gelu",
              "norm": "layernorm"},
    "training": {"seq_len": 48},
}


def write_checkpoint(path: Path, raw_spec: dict[str, Any], tokenizer: AnyTokenizer | None = None,
                     seed: int = 0) -> tuple[torch.nn.Module, AnyTokenizer]:
    """A checkpoint of a model with every weight moved off its init (norms are not identities)."""
    spec = parse_spec(raw_spec)
    tokenizer = tokenizer or ByteTokenizer()
    torch.manual_seed(seed)
    model = build_model(spec.model, tokenizer.vocab_size, spec.training.seq_len)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint(path, {"spec": spec_to_dict(spec), "tokenizer": tokenizer.state_dict(),
                           "model": model.state_dict(), "step": 1})
    return model.eval(), tokenizer


def assert_hf_matches(folder: Path, model: torch.nn.Module, tokenizer: AnyTokenizer, prompt: str,
                      new_tokens: int = 16) -> None:
    """transformers loads `folder`; its logits are the engine's within 1e-4 and greedy text is equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    ids = hf_tok(prompt)["input_ids"]
    assert ids == tokenizer.encode(prompt)
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x), hf_model(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    out = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False)
    hf_text = hf_tok.decode(out[0, len(ids):].tolist())
    engine_text = generate(model, tokenizer, prompt, new_tokens, temperature=0, seq_len=model.seq_len)
    assert hf_text == engine_text and len(out[0]) == len(ids) + new_tokens


def extract_tar(tar: tarfile.TarFile, dest: Path) -> None:
    """extractall with the safe "data" filter where this Python has it (3.11.4+; CI may run 3.11.2)."""
    tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
