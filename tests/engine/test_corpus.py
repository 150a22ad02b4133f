"""Corpus files: chunked tokenization into a cached, memory-mapped token file that gives the same batches
as the in-memory stream, reused when valid and rebuilt when damaged."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch

from worker.engine import corpus as corpus_mod
from worker.engine.config import TokenizerConfig
from worker.engine.corpus import (
    CorpusFile,
    bpe_cut,
    data_for,
    encode_chunks,
    file_sha256,
    iter_text,
    sidecar_path,
    token_file_for,
    tokenizer_for,
)
from worker.engine.data import DataError, TokenData, load_text_data
from worker.engine.tokenizers import build_tokenizer, train_bpe
from worker.engine.trainer import Trainer

from .spec_helpers import corpus, spec

KINDS = [TokenizerConfig(kind="byte"), TokenizerConfig(kind="char"), TokenizerConfig(kind="bpe", vocab_size=300)]


def _odd_text() -> str:
    """The test corpus plus the characters that chunking could get wrong: CRLF, line separators, runs
    of mixed whitespace, multi-byte characters and contractions."""
    rnd = random.Random(7)
    pieces = ["a", "bc", " ", "\n", "\n\n", "  ", "\t", "\r\n", "\r", "\x0b", "\u2028", "é", "漢字", "'s", "\x1c",
              "12", "🙂", " \n "]
    return corpus(12_000) + "".join(rnd.choice(pieces) for _ in range(6_000))


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_bytes(_odd_text().encode("utf-8"))
    return path


@pytest.fixture(autouse=True)
def _no_bpe_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STABLETRAIN_TOKENIZER_CACHE", raising=False)


@pytest.mark.parametrize("cfg", KINDS, ids=lambda c: c.kind)
def test_memmap_batches_equal_in_memory_batches(corpus_file: Path, tmp_path: Path, cfg: TokenizerConfig) -> None:
    text = corpus_file.read_text(encoding="utf-8")  # what the worker read before: universal newlines
    source = CorpusFile(corpus_file, tmp_path / "tokens")
    tok_file, tok_text = tokenizer_for(cfg, source), build_tokenizer(cfg, text)
    assert tok_file.state_dict() == tok_text.state_dict()
    mapped = data_for(source, tok_file, seq_len=24, val_fraction=0.1)
    memory = load_text_data(text, tok_text, seq_len=24, val_fraction=0.1)
    assert mapped.tokens.dtype == torch.uint16 and memory.tokens.dtype == torch.long
    assert torch.equal(mapped.tokens.long(), memory.tokens)
    assert (mapped.n_train, mapped.n_val) == (memory.n_train, memory.n_val)
    g_mapped, g_memory = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for split in ["train", "val", "train", "val", "train"]:
        xm, ym, om = mapped.batch_with_offsets(split, 16, g_mapped)
        xt, yt, ot = memory.batch_with_offsets(split, 16, g_memory)
        assert xm.dtype == torch.long and torch.equal(xm, xt) and torch.equal(ym, yt) and torch.equal(om, ot)
    assert mapped.excerpt(100, 20) == memory.excerpt(100, 20)


@pytest.mark.parametrize("chunk_chars", [1, 7, 333])
def test_bpe_chunked_encoding_equals_whole_text(corpus_file: Path, chunk_chars: int) -> None:
    text = corpus_file.read_text(encoding="utf-8")
    tok = build_tokenizer(KINDS[2], text)
    ids = [i for part in encode_chunks(tok, iter_text(corpus_file, chunk_chars)) for i in part]
    assert ids == tok.encode(text)


def test_bpe_trained_from_chunks_equals_trained_from_text(corpus_file: Path) -> None:
    text = corpus_file.read_text(encoding="utf-8")
    assert train_bpe(iter_text(corpus_file, 97), 300) == train_bpe([text], 300)


def test_bpe_cut_lands_after_non_space_before_space_or_newline() -> None:
    assert bpe_cut("ab  cd\n\nef") == 6 and bpe_cut("ab  cd  ") == 6 and bpe_cut("ab cd") == 2
    assert bpe_cut("   \n\n") == 0 and bpe_cut("abcdef") == 0
    assert bpe_cut("ab cd ef", start=4) == 5 and bpe_cut("ab cd", start=3) == 0


def test_crlf_split_between_chunks_reads_as_one_newline(tmp_path: Path) -> None:
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"ab\r\ncd\r\n\r\nef")
    assert "".join(iter_text(path, 3)) == path.read_text(encoding="utf-8") == "ab\ncd\n\nef"


def test_token_cache_reused_without_tokenizing_again(corpus_file: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    tok = build_tokenizer(KINDS[0], "")
    first = token_file_for(corpus_file, tok, tmp_path / "tokens")
    assert first.path.name == f"{file_sha256(corpus_file)}-byte-{corpus_mod.tokenizer_key(tok)}.u16"
    meta = json.loads(sidecar_path(first.path).read_text())
    assert meta["n_tokens"] == first.n_tokens == len(corpus_file.read_text(encoding="utf-8").encode())
    stamp = first.path.stat().st_mtime_ns

    def refuse(*args: object) -> None:
        raise AssertionError("tokenized again")

    monkeypatch.setattr(corpus_mod, "build_token_file", refuse)
    again = token_file_for(corpus_file, tok, tmp_path / "tokens")
    assert again == first and first.path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == [first.path.name, sidecar_path(first.path).name]


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_sidecar", "bad_sidecar"])
def test_damaged_token_file_is_rebuilt(corpus_file: Path, tmp_path: Path, damage: str) -> None:
    tok = build_tokenizer(KINDS[0], "")
    built = token_file_for(corpus_file, tok, tmp_path / "tokens")
    good = built.path.read_bytes()
    if damage == "truncate":
        built.path.write_bytes(good[: len(good) // 2])
    elif damage == "flip":
        built.path.write_bytes(good[:10] + bytes([good[10] ^ 1]) + good[11:])
    elif damage == "no_sidecar":
        sidecar_path(built.path).unlink()
    else:
        sidecar_path(built.path).write_text("{not json")
    rebuilt = token_file_for(corpus_file, tok, tmp_path / "tokens")
    assert rebuilt == built and built.path.read_bytes() == good
    assert json.loads(sidecar_path(built.path).read_text())["n_tokens"] == built.n_tokens


def test_each_tokenizer_gets_its_own_token_file(corpus_file: Path, tmp_path: Path) -> None:
    source = CorpusFile(corpus_file, tmp_path / "tokens")
    files = {token_file_for(corpus_file, tokenizer_for(cfg, source), source.cache_dir).path for cfg in KINDS}
    files.add(token_file_for(corpus_file, tokenizer_for(TokenizerConfig(kind="bpe", vocab_size=280), source),
                             source.cache_dir).path)
    assert len(files) == 4


def test_wide_vocabulary_uses_uint32(tmp_path: Path) -> None:
    path = tmp_path / "wide.txt"
    path.write_text("".join(chr(0x10000 + i) for i in range(70_000)), encoding="utf-8")
    source = CorpusFile(path, tmp_path / "tokens")
    data = data_for(source, tokenizer_for(TokenizerConfig(kind="char"), source), seq_len=8, val_fraction=0.1)
    assert data.tokens.dtype == torch.uint32 and data.excerpt(69_990, 10) == list(range(69_990, 70_000))
    x, y = data.batch("val", 4, torch.Generator().manual_seed(0))
    assert x.dtype == torch.long and int(x.min()) >= data.n_train and torch.equal(y - x, torch.ones_like(x))


def test_empty_and_short_files_raise_data_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="corpus is empty"):
        data_for(CorpusFile(empty, tmp_path / "tokens"), build_tokenizer(KINDS[0], ""), 8, 0.1)
    short = tmp_path / "short.txt"
    short.write_text("x" * 30)
    with pytest.raises(DataError, match="corpus has 30 tokens"):
        data_for(CorpusFile(short, tmp_path / "tokens"), build_tokenizer(KINDS[0], ""), 8, 0.1)


def test_token_data_to_device_keeps_a_mapped_stream_on_the_host(corpus_file: Path, tmp_path: Path) -> None:
    data = data_for(CorpusFile(corpus_file, tmp_path / "tokens"), build_tokenizer(KINDS[0], ""), 8, 0.1)
    moved = data.to("cpu")
    assert moved.tokens is data.tokens and isinstance(moved, TokenData)


def test_trainer_on_a_corpus_file_matches_training_on_its_text(corpus_file: Path, tmp_path: Path) -> None:
    s = spec(training={"max_steps": 6, "eval_every": 3})
    from_text = Trainer(s, corpus_file.read_text(encoding="utf-8"), tmp_path / "a")
    from_file = Trainer(s, CorpusFile(corpus_file, tmp_path / "tokens"), tmp_path / "b")
    assert from_text.run().status == from_file.run().status == "succeeded"
    for (name, a), (_, b) in zip(from_text.model.state_dict().items(), from_file.model.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in from_text.history.step_rows()] == [r["loss"] for r in from_file.history.step_rows()]


def test_compact_tensor_without_a_file_batches_like_int64() -> None:
    compact = TokenData(torch.arange(1000).to(torch.uint16), seq_len=8, val_fraction=0.1)
    wide = TokenData(torch.arange(1000), seq_len=8, val_fraction=0.1)
    for split in ("train", "val"):
        a = compact.batch_with_offsets(split, 6, torch.Generator().manual_seed(1))
        b = wide.batch_with_offsets(split, 6, torch.Generator().manual_seed(1))
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and a[0].dtype == torch.long


def test_batches_from_a_token_file_do_not_share_the_read_buffer(corpus_file: Path, tmp_path: Path) -> None:
    """The reader reuses one buffer per batch size: a batch kept by the caller must not change under it."""
    mapped = data_for(CorpusFile(corpus_file, tmp_path / "tokens"), build_tokenizer(KINDS[0], ""), 16, 0.1)
    wide = TokenData(mapped.tokens.long(), 16, 0.1)
    g_mapped, g_wide = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    kept = [mapped.batch("train", 8, g_mapped) for _ in range(3)] + [mapped.batch("val", 3, g_mapped)]
    expected = [wide.batch("train", 8, g_wide) for _ in range(3)] + [wide.batch("val", 3, g_wide)]
    for (x, y), (xe, ye) in zip(kept, expected, strict=True):
        assert torch.equal(x, xe) and torch.equal(y, ye)


def test_token_data_copies_draw_from_several_threads(corpus_file: Path, tmp_path: Path) -> None:
    """`.to` copies share one reader; each thread reads into its own buffer, so batches stay exact."""
    mapped = data_for(CorpusFile(corpus_file, tmp_path / "tokens"), build_tokenizer(KINDS[0], ""), 16, 0.1)
    wide = TokenData(mapped.tokens.long(), 16, 0.1)
    copies = [mapped.to("cpu") for _ in range(4)]
    results: dict[int, list[torch.Tensor]] = {}

    def draw(k: int) -> None:
        gen = torch.Generator().manual_seed(k)
        results[k] = [copies[k].batch("train", 16, gen)[0] for _ in range(200)]

    threads = [threading.Thread(target=draw, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        gen = torch.Generator().manual_seed(k)
        assert all(torch.equal(x, wide.batch("train", 16, gen)[0]) for x in results[k]), k


def test_window_past_the_end_of_a_short_token_file_raises(corpus_file: Path, tmp_path: Path) -> None:
    source = CorpusFile(corpus_file, tmp_path / "tokens")
    tok = build_tokenizer(KINDS[0], "")
    mapped = data_for(source, tok, 16, 0.1)
    token_path = token_file_for(corpus_file, tok, tmp_path / "tokens").path
    with open(token_path, "r+b") as fh:  # the file shrinks under a running job (damaged storage)
        fh.truncate(mapped.n_train)
    with pytest.raises(DataError, match="ends before offset"):
        mapped.batch("val", 4, torch.Generator().manual_seed(0))


def test_resume_on_a_corpus_file_is_bit_identical(corpus_file: Path, tmp_path: Path) -> None:
    s = spec(tokenizer={"kind": "char"}, training={"max_steps": 8, "eval_every": 4})
    source = CorpusFile(corpus_file, tmp_path / "tokens")
    straight = Trainer(s, source, tmp_path / "a")
    assert straight.run().status == "succeeded"
    first = Trainer(s, source, tmp_path / "b")
    for _ in range(3):
        first.train_step()
    info = first.save()
    resumed = Trainer(s, source, tmp_path / "c", resume_from=Path(info["path"]))
    assert resumed.run().status == "succeeded" and resumed.step == 8
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert len(list(source.cache_dir.glob("*.u16"))) == 1, "the resumed run reads the same token file"
