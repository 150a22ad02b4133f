"""Tokenizers: lossless UTF-8 bytes, the corpus' own characters, or a byte-level BPE trained on it.

A tokenizer's `state_dict()` holds only plain str/int/list values so that it
survives `torch.load(weights_only=True)` inside a checkpoint.

The BPE kind is the one place the engine uses a package other than torch: `tokenizers`, imported
inside the two functions that need it (never when this module is imported; tests/engine/test_purity.py
lists them). Its tokenizer.json is the Hugging Face export's tokenizer as is, so the engine and
transformers split text into the same ids by construction, not by a hand-written copy of the rules.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
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


class BpeTokenizer:
    """Byte-level BPE (GPT-2's scheme): every byte is a token, merges learned from the corpus.

    Lossless for any text, as the byte tokenizer, with fewer ids per text.
    """

    kind = "bpe"

    def __init__(self, tokenizer_json: str) -> None:
        self.json = tokenizer_json
        self._tok = _hf_tokenizer(tokenizer_json)
        self.vocab_size = int(self._tok.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """Text to ids (no special tokens: the tokenizer has none)."""
        return list(self._tok.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        """Ids to text; bytes that are not valid UTF-8 (sampled ids) become U+FFFD."""
        n = self.vocab_size
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < n])

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: the tokenizer.json text."""
        return {"kind": self.kind, "json": self.json}


AnyTokenizer = ByteTokenizer | CharTokenizer | BpeTokenizer

# Where trained BPE tokenizers are kept (the worker points it into its storage folder); unset: no cache.
TOKENIZER_CACHE_ENV = "STABLETRAIN_TOKENIZER_CACHE"
# Part of the cache key: a change to how train_bpe trains must not reuse older files.
BPE_RECIPE = "bytelevel-v1"


def build_tokenizer(cfg: TokenizerConfig, text: str, cache_dir: Path | None = None) -> AnyTokenizer:
    """Tokenizer of the configured kind, fitted to `text` where the kind needs it.

    A BPE tokenizer is looked up in `cache_dir` (default: $STABLETRAIN_TOKENIZER_CACHE) by the
    text's sha256 and the settings, and trained and stored there only when absent.
    """
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "char":
        return CharTokenizer.from_text(text)
    if cfg.kind == "bpe":
        cache = cache_dir or (Path(os.environ[TOKENIZER_CACHE_ENV]) if os.environ.get(TOKENIZER_CACHE_ENV) else None)
        return BpeTokenizer(cached_bpe_json(text, cfg.vocab_size, cache))
    raise ValueError(f"unknown tokenizer kind {cfg.kind!r}")


def bpe_cache_path(cache_dir: Path, text: str, vocab_size: int) -> Path:
    """Cache file of the BPE of `text` at `vocab_size` (the dataset's sha256 names the text)."""
    return bpe_cache_file(cache_dir, hashlib.sha256(text.encode("utf-8")).hexdigest(), vocab_size)


def bpe_cache_file(cache_dir: Path, digest: str, vocab_size: int) -> Path:
    """Cache file of the BPE of the corpus whose sha256 is `digest`."""
    return Path(cache_dir) / f"bpe-{digest}-{vocab_size}-{BPE_RECIPE}.json"


def cached_bpe_json(text: str, vocab_size: int, cache_dir: Path | None) -> str:
    """tokenizer.json of the BPE of `text`: from the cache when there, else trained (and stored)."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return cached_bpe_json_of_chunks(digest, lambda: [text], vocab_size, cache_dir)


def cached_bpe_json_of_chunks(digest: str, chunks: Callable[[], Iterable[str]], vocab_size: int,
                              cache_dir: Path | None) -> str:
    """tokenizer.json of the BPE of the corpus `chunks()` streams (sha256 `digest`): cached, else trained."""
    if cache_dir is None:
        return train_bpe(chunks(), vocab_size)
    path = bpe_cache_file(cache_dir, digest, vocab_size)
    try:
        cached = path.read_text(encoding="utf-8")
        _hf_tokenizer(cached)  # a damaged file is trained again, not trusted
        return cached
    except (OSError, ValueError):
        pass
    trained = train_bpe(chunks(), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(trained)
        os.replace(tmp, path)  # concurrent trainers of the same key write the same content
    finally:
        Path(tmp).unlink(missing_ok=True)
    return trained


# What str.splitlines() breaks at; "\r" may be the first half of "\r\n", so a chunk ending in it waits.
LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
BPE_LINES_PER_ITEM = 1000


def line_groups(chunks: Iterable[str], lines_per_item: int = BPE_LINES_PER_ITEM) -> Iterator[str]:
    """The text of `chunks` as items of `lines_per_item` lines each (str.splitlines of the whole text).

    Chunk ends may fall anywhere; a line cut by one waits for its rest, so the items are the same as
    those of the text in one piece (the trained merges depend on where items end).
    """
    carry = ""
    pending: list[str] = []
    for chunk in chunks:
        lines = (carry + chunk).splitlines(keepends=True)
        carry = lines.pop() if lines and (lines[-1][-1] not in LINE_BREAKS or lines[-1][-1] == "\r") else ""
        pending += lines
        while len(pending) >= lines_per_item:
            yield "".join(pending[:lines_per_item])
            del pending[:lines_per_item]
    if carry:
        pending.append(carry)
    if pending:
        yield "".join(pending)


def train_bpe(chunks: Iterable[str], vocab_size: int) -> str:
    """tokenizer.json of a byte-level BPE trained on the text `chunks` stream, with at most `vocab_size` ids.

    The 256 byte symbols are always in the vocabulary (initial alphabet), so any text encodes. The text
    reaches the trainer in items of 1,000 lines, never whole.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(chunks, str):
        chunks = [chunks]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(line_groups(chunks), trainer)
    return tok.to_str()


def _hf_tokenizer(tokenizer_json: str) -> Any:
    """A `tokenizers.Tokenizer` from its JSON; ValueError when it is not one."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(tokenizer_json)
    except Exception as exc:  # tokenizers raises a bare Exception for bad JSON
        raise ValueError(f"not a tokenizer.json: {str(exc)[:200]}") from exc


def tokenizer_from_state(state: dict[str, Any]) -> AnyTokenizer:
    """Rebuild a tokenizer from its `state_dict()`."""
    kind = state.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(list(state["chars"]))
    if kind == "bpe":
        if not isinstance(state.get("json"), str):
            raise ValueError("a bpe tokenizer state needs its tokenizer.json text under 'json'")
        return BpeTokenizer(state["json"])
    raise ValueError(f"unknown tokenizer kind {kind!r}")
