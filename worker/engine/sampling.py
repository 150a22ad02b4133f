"""Text generation from a model or a checkpoint file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from worker.engine.config import JobSpec, parse_spec, upgrade_legacy_spec
from worker.engine.models import build_model
from worker.engine.tokenizers import AnyTokenizer, tokenizer_from_state


def start_ids(tokenizer: AnyTokenizer, prompt: str) -> list[int]:
    """Prompt ids; an empty prompt starts from a newline (or id 0 if newline is unknown)."""
    ids = tokenizer.encode(prompt)
    if ids:
        return ids
    newline = tokenizer.encode("\n")
    unk = getattr(tokenizer, "unk_id", None)
    return newline if newline and newline[0] != unk else [0]


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> int:
    """One id from last-position logits [V]: greedy at temperature 0, else top-k sampling."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))


def generate(
    model: nn.Module,
    tokenizer: AnyTokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    seq_len: int | None = None,
    device: str | torch.device = "cpu",
) -> str:
    """Continue `prompt` by up to max_new_tokens; returns only the generated text."""
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    seq_len = seq_len or getattr(model, "seq_len", None)
    if not seq_len:
        raise ValueError("seq_len is required for a model without a seq_len attribute")
    # Draw on the CPU so a seed gives the same text on any device.
    gen = torch.Generator().manual_seed(seed)
    ids = start_ids(tokenizer, prompt)
    was_training = model.training
    model.eval()
    out: list[int] = []
    try:
        with torch.inference_mode():
            seq = torch.tensor([ids], dtype=torch.long, device=device)
            for _ in range(max_new_tokens):
                logits = model(seq[:, -seq_len:])[0, -1].float().cpu()
                nxt = _next_token(logits, temperature, top_k, gen)
                out.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]], device=seq.device)], dim=1)
    finally:
        model.train(was_training)
    return tokenizer.decode(out)


def load_model_file(path: str | Path, device: str = "cpu") -> tuple[JobSpec, nn.Module, AnyTokenizer]:
    """(spec, model in eval mode, tokenizer) from a checkpoint (.pt) or a weights-only .safetensors file.

    A .safetensors file is read by stabletrain_export.weights (the safetensors package), imported
    only for such a file so the engine itself stays torch + stdlib.
    """
    if Path(path).suffix == ".safetensors":
        from stabletrain_export.weights import read_engine_state

        state = read_engine_state(Path(path))
    else:
        # Read to the CPU: the file also holds optimizer (and rollback) state; only the model goes to `device`.
        state = torch.load(path, map_location="cpu", weights_only=True)
    spec = parse_spec(upgrade_legacy_spec(state["spec"]))
    tokenizer = tokenizer_from_state(state["tokenizer"])
    model = build_model(spec.model, tokenizer.vocab_size, spec.training.seq_len)
    # A checkpoint of a torch.compile'd model prefixes every key; accept both.
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state["model"].items()})
    return spec, model.to(device).eval(), tokenizer


def sample_from_checkpoint(
    path: str | Path,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> str:
    """Load a checkpoint or weights file (spec, tokenizer, model) and generate from it."""
    spec, model, tokenizer = load_model_file(path, device)
    return generate(
        model, tokenizer, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
        seed=seed, seq_len=spec.training.seq_len, device=device,
    )
