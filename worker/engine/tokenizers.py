"""Tokenizers: lossless UTF-8 bytes, or the corpus' own characters.

A tokenizer's `state_dict()` holds only plain str/int/list values so that it
survives `torch.load(weights_only=True)` inside a checkpoint.
"""

from __future__ import annotations

from typing import Any, Protocol

from worker.engine.config import TokenizerConfig

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: 256 ids, lossless for any text."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """Text to its UTF-8 byte values."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Byte values to text; invalid sequences (sampled ids) become U+FFFD."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (nothing but the kind)."""
        return {"kind": self.kind}


class CharTokenizer:
    """One id per distinct corpus character, plus one id for unseen characters."""

    kind = "char"

    def __init__(self, chars: list[str]) -> None:
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("char tokenizer needs distinct single characters")
        self.chars = list(chars)
        self._ids = {c: i for i, c in enumerate(self.chars)}
        # The last id stands for any character the corpus never contained.
        self.unk_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Vocabulary of the text's sorted distinct characters."""
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        """Characters to ids; unseen characters map to `unk_id`."""
        ids = self._ids
        unk = self.unk_id
        return [ids.get(c, unk) for c in text]

    def decode(self, ids: list[int]) -> str:
        """Ids to text; the unknown id (or any out-of-range id) becomes U+FFFD."""
        chars = self.chars
        n = len(chars)
        return "".join(chars[i] if 0 <= i < n else REPLACEMENT_CHAR for i in map(int, ids))

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: the character list, in id order."""
        return {"kind": self.kind, "chars": list(self.chars)}


AnyTokenizer = ByteTokenizer | CharTokenizer


def build_tokenizer(cfg: TokenizerConfig, text: str) -> AnyTokenizer:
    """Tokenizer of the configured kind, fitted to `text` where the kind needs it."""
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "char":
        return CharTokenizer.from_text(text)
    raise ValueError(f"unknown tokenizer kind {cfg.kind!r}")


def tokenizer_from_state(state: dict[str, Any]) -> AnyTokenizer:
    """Rebuild a tokenizer from its `state_dict()`."""
    kind = state.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(list(state["chars"]))
    raise ValueError(f"unknown tokenizer kind {kind!r}")
