"""Tokenizers: lossless bytes, corpus characters, unknowns, state round trip."""

import json

import pytest

from worker.engine.config import TokenizerConfig
from worker.engine.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    build_tokenizer,
    tokenizer_from_state,
)

TEXTS = ["hello, world\n", "训练稳定的模型。", "emoji 🙂🚀 and ünïcödé", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_decode_of_invalid_ids_replaces() -> None:
    tok = ByteTokenizer()
    # A lone continuation byte and a truncated 3-byte sequence, as sampling can produce.
    out = tok.decode([0x80, ord("a"), 0xE8, 0xAE])
    assert "a" in out and "\ufffd" in out


def test_char_vocab_is_sorted_distinct_chars_plus_unknown() -> None:
    tok = build_tokenizer(TokenizerConfig(kind="char"), "banana 香蕉")
    assert tok.chars == sorted(set("banana 香蕉"))
    assert tok.vocab_size == len(tok.chars) + 1
    assert tok.decode(tok.encode("a 香 nab")) == "a 香 nab"


def test_char_unknown_chars_map_to_unk() -> None:
    tok = CharTokenizer.from_text("abc")
    ids = tok.encode("abz!")
    assert ids[:2] == [0, 1]
    assert ids[2:] == [tok.unk_id, tok.unk_id]
    assert tok.decode(ids) == "ab\ufffd\ufffd"


@pytest.mark.parametrize("kind", ["byte", "char"])
def test_state_round_trip_is_json(kind: str) -> None:
    text = "state 状态 🙂"
    tok = build_tokenizer(TokenizerConfig(kind=kind), text)
    state = json.loads(json.dumps(tok.state_dict()))
    again = tokenizer_from_state(state)
    assert again.kind == kind
    assert again.vocab_size == tok.vocab_size
    assert again.encode(text) == tok.encode(text)


def test_unknown_kind_rejected() -> None:
    with pytest.raises(ValueError):
        tokenizer_from_state({"kind": "wordpiece"})
    with pytest.raises(ValueError, match="tokenizer.json"):
        tokenizer_from_state({"kind": "bpe"})
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        tokenizer_from_state({"kind": "bpe", "json": "{broken"})
