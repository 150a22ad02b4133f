"""Parameter count for the MAX_PARAMS limit: the engine's exact analytic count (standard library only)."""

from __future__ import annotations

from typing import Any

from worker.engine.estimate import count_params

# byte tokenizer: 256 ids; a char tokenizer's vocabulary is unknown until the corpus is read,
# so 256 is used for it too (close for mostly-ASCII text).
VOCAB_ESTIMATE = 256


def vocab_estimate(tokenizer: dict[str, Any]) -> int:
    """Vocabulary size to count with: a BPE's configured bound (its most ids), else VOCAB_ESTIMATE."""
    return int(tokenizer.get("vocab_size", VOCAB_ESTIMATE)) if tokenizer.get("kind") == "bpe" else VOCAB_ESTIMATE


def estimate_params(model: dict[str, Any], seq_len: int, vocab: int = VOCAB_ESTIMATE) -> int:
    """Trainable parameters of a parsed spec's model section at `vocab` (exact for that vocabulary)."""
    return count_params(model, vocab, seq_len)
