"""Pure-python parameter count estimate per architecture (for the MAX_PARAMS limit)."""

from __future__ import annotations

from typing import Any

# byte tokenizer: 256 ids; a char tokenizer's vocabulary is unknown until the corpus is read,
# so 256 is used for it too (close for mostly-ASCII text).
VOCAB_ESTIMATE = 256

GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def _norm_params(norm: str, width: int) -> int:
    return {"none": 0, "rmsnorm": width}.get(norm, 2 * width)


def _block_norms(m: dict[str, Any], first_in: int, h: int) -> int:
    """Norms of n blocks: pre-norm on each block's input plus a final one, post-norm on each output."""
    n, norm = m["n_layers"], m["norm"]
    if m.get("norm_position", "pre") == "pre":
        return _norm_params(norm, first_in) + n * _norm_params(norm, h)
    return n * _norm_params(norm, h)


def _mlp(m: dict[str, Any], vocab: int) -> int:
    d, h, n = m["d_model"], m["hidden"], m["n_layers"]
    c = m["context"] * d
    skip = c * h if m.get("residual") and c != h else 0
    body = c * h + h + skip + (n - 1) * (h * h + h) + _block_norms(m, c, h)
    tied = m.get("tie_embeddings") and h == d
    return vocab * d + body + vocab + (0 if tied else h * vocab)


def _recurrent(m: dict[str, Any], vocab: int) -> int:
    d, h, n, g = m["d_model"], m["hidden"], m["n_layers"], GATES[m["arch"]]
    first = g * (d * h + h * h + 2 * h)
    rest = (n - 1) * g * (2 * h * h + 2 * h)
    norms = _block_norms(m, d, h)
    skip = d * h if m.get("residual") and d != h else 0
    tied = m.get("tie_embeddings") and h == d
    head = vocab + (0 if tied else h * vocab)
    return vocab * d + first + rest + norms + skip + head


def _transformer(m: dict[str, Any], vocab: int, seq_len: int) -> int:
    d, n = m["d_model"], m["n_layers"]
    h = m.get("hidden") or 4 * d  # the FFN width
    per_layer = 4 * d * d + 4 * d + 2 * d * h + h + d + 2 * _norm_params(m["norm"], d)
    head = 0 if m.get("tie_embeddings") else d * vocab
    return vocab * d + seq_len * d + n * per_layer + _norm_params(m["norm"], d) + head


def estimate_params(model: dict[str, Any], seq_len: int, vocab: int = VOCAB_ESTIMATE) -> int:
    """Approximate trainable parameters: embeddings + layers + head."""
    arch = model["arch"]
    if arch == "mlp":
        return _mlp(model, vocab)
    if arch == "transformer":
        return _transformer(model, vocab, seq_len)
    return _recurrent(model, vocab)
