"""A corpus file tokenized once into a memory-mapped token file, cached by content and tokenizer.

The worker trains from a local UTF-8 file (`CorpusFile`): the tokenizer is fitted to it in streamed
chunks, the corpus is encoded chunk by chunk into `<cache>/<sha256>-<kind>-<tokenizer key>.u16`
(uint16 when vocab_size <= 65535, else `.u32`), and `TokenData.from_token_file` maps that file. The
text is never held whole as str, id list and int64 tensor at once.

A token file is valid only with its sidecar `<name>.json` (format, dtype, count, sizes, sha256 of the
token bytes, the dataset's sha256 and the tokenizer key): both are written to a temp file and renamed
(data first, sidecar last), and a file whose size or sha256 disagrees with its sidecar is rebuilt.

Text is read as `Path.read_text` reads it (universal newlines: "\\r\\n" and "\\r" become "\\n", also when
a chunk ends between them), so a file gives the same ids as `load_text_data(path.read_text(), ...)`.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from stabletrain_storage.base import file_sha256
from worker.engine.config import TokenizerConfig
from worker.engine.data import DataError, TokenData, _too_short_message, load_text_data
from worker.engine.tokenizers import (
    TOKENIZER_CACHE_ENV,
    AnyTokenizer,
    BpeTokenizer,
    ByteTokenizer,
    CharTokenizer,
    build_tokenizer,
    cached_bpe_json_of_chunks,
)

TOKEN_FORMAT = "stabletrain-tokens-v1"
CHUNK_CHARS = 1 << 20  # characters per read: a few MB of str and ids at a time
# (suffix, array typecode, torch dtype) by the widest id a tokenizer can produce
UINT16 = (".u16", "H", torch.uint16)
UINT32 = (".u32", "I", torch.uint32)
if array.array("H").itemsize != 2 or array.array("I").itemsize != 4:  # C types; true on every platform torch runs on
    raise ImportError("token files need 2-byte 'H' and 4-byte 'I' arrays")


@dataclass(frozen=True)
class CorpusFile:
    """A local UTF-8 corpus file and the folder its token files are cached in.

    `sha256` is the file's digest when the caller knows it (the dataset record's); else it is computed.
    """

    path: Path
    cache_dir: Path
    sha256: str | None = None


@dataclass(frozen=True)
class TokenFile:
    """A valid token file: where, which dtype, how many ids."""

    path: Path
    dtype: torch.dtype
    n_tokens: int


def iter_text(path: Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """The file's text in chunks, with the newline translation of `Path.read_text`."""
    with open(path, encoding="utf-8") as fh:
        while chunk := fh.read(chunk_chars):
            yield chunk


# ---- tokenizer and data for a training source (text in memory, or a corpus file) -------------------

def tokenizer_for(cfg: TokenizerConfig, source: str | CorpusFile) -> AnyTokenizer:
    """The configured tokenizer fitted to the source (a BPE from the cache when trained before)."""
    if isinstance(source, str):
        return build_tokenizer(cfg, source)
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "char":
        chars: set[str] = set()
        for chunk in iter_text(source.path):
            chars.update(chunk)
        return CharTokenizer(sorted(chars))
    if cfg.kind == "bpe":
        env = os.environ.get(TOKENIZER_CACHE_ENV)
        return BpeTokenizer(cached_bpe_json_of_chunks(
            _corpus_sha256(source), lambda: iter_text(source.path), cfg.vocab_size, Path(env) if env else None))
    raise ValueError(f"unknown tokenizer kind {cfg.kind!r}")


def data_for(source: str | CorpusFile, tokenizer: AnyTokenizer, seq_len: int, val_fraction: float) -> TokenData:
    """TokenData of the source: tokenized in memory for text, memory-mapped from the token cache for a file."""
    if isinstance(source, str):
        return load_text_data(source, tokenizer, seq_len, val_fraction)
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}")
    tokens = token_file_for(source.path, tokenizer, source.cache_dir, source.sha256)
    if tokens.n_tokens == 0:
        raise DataError(_too_short_message(0, seq_len, val_fraction))
    return TokenData.from_token_file(tokens.path, tokens.dtype, tokens.n_tokens, seq_len, val_fraction)


def _corpus_sha256(source: CorpusFile) -> str:
    return source.sha256 or file_sha256(source.path)


# ---- the token file cache ---------------------------------------------------------------------------

def tokenizer_key(tokenizer: AnyTokenizer) -> str:
    """Identity of a tokenizer's ids: digest of its state (a trained BPE's whole tokenizer.json)."""
    state = json.dumps(tokenizer.state_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{TOKEN_FORMAT}\n{state}".encode()).hexdigest()[:24]


def _layout(tokenizer: AnyTokenizer) -> tuple[str, str, torch.dtype]:
    return UINT16 if tokenizer.vocab_size <= 0xFFFF else UINT32


def token_file_path(cache_dir: Path, sha256: str, tokenizer: AnyTokenizer) -> Path:
    """Where the tokens of the corpus with this sha256 under this tokenizer are cached."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r:.80}")
    suffix = _layout(tokenizer)[0]
    return Path(cache_dir) / f"{sha256}-{tokenizer.kind}-{tokenizer_key(tokenizer)}{suffix}"


def sidecar_path(path: Path) -> Path:
    """The JSON beside a token file that makes it valid."""
    return path.with_name(path.name + ".json")


def token_file_for(dataset_path: Path, tokenizer: AnyTokenizer, cache_dir: Path,
                   sha256: str | None = None) -> TokenFile:
    """The valid cached token file of a corpus file under a tokenizer, built (once) when absent or damaged."""
    sha = sha256 or file_sha256(dataset_path)
    path = token_file_path(cache_dir, sha, tokenizer)
    found = read_valid_token_file(path, sha, tokenizer)
    if found is not None:
        return found
    return build_token_file(dataset_path, tokenizer, path, sha)


def read_valid_token_file(path: Path, sha256: str, tokenizer: AnyTokenizer) -> TokenFile | None:
    """The token file when it and its sidecar agree (size, sha256, corpus, tokenizer), else None."""
    dtype = _layout(tokenizer)[2]
    try:
        meta = json.loads(sidecar_path(path).read_text(encoding="utf-8"))
        expected = {"format": TOKEN_FORMAT, "dtype": str(dtype).removeprefix("torch."), "byteorder": sys.byteorder,
                    "dataset_sha256": sha256, "tokenizer_key": tokenizer_key(tokenizer)}
        if any(meta.get(k) != v for k, v in expected.items()):
            return None
        n_tokens = int(meta["n_tokens"])
        if path.stat().st_size != n_tokens * dtype.itemsize:
            return None
        if file_sha256(path) != meta["sha256"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return TokenFile(path, dtype, n_tokens)


def build_token_file(dataset_path: Path, tokenizer: AnyTokenizer, path: Path, sha256: str) -> TokenFile:
    """Tokenize the corpus in chunks into `path` (temp + rename), then write its sidecar the same way."""
    _suffix, typecode, dtype = _layout(tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar_path(path).unlink(missing_ok=True)  # the old data is not to be trusted while it is replaced
    digest = hashlib.sha256()
    n_tokens = 0
    with _atomic_file(path, "wb") as fh:
        for ids in encode_chunks(tokenizer, iter_text(dataset_path)):
            block = array.array(typecode, ids).tobytes()
            digest.update(block)
            fh.write(block)
            n_tokens += len(ids)
    meta = {"format": TOKEN_FORMAT, "dtype": str(dtype).removeprefix("torch."), "byteorder": sys.byteorder,
            "n_tokens": n_tokens, "bytes": n_tokens * dtype.itemsize,
            "sha256": digest.hexdigest(), "dataset_sha256": sha256, "tokenizer_kind": tokenizer.kind,
            "tokenizer_key": tokenizer_key(tokenizer), "vocab_size": tokenizer.vocab_size}
    with _atomic_file(sidecar_path(path), "w") as fh:
        json.dump(meta, fh, sort_keys=True)
    return TokenFile(path, dtype, n_tokens)


@contextmanager
def _atomic_file(path: Path, mode: str) -> Iterator[IO]:
    """A temp file beside `path`, flushed to disk and renamed onto it on success, removed on failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # concurrent builders of one key write the same bytes
    finally:
        Path(tmp).unlink(missing_ok=True)


# ---- chunked encoding --------------------------------------------------------------------------------

def encode_chunks(tokenizer: AnyTokenizer, chunks: Iterator[str]) -> Iterator[list[int]]:
    """Ids of the text `chunks` stream, equal to `tokenizer.encode` of the whole text.

    Byte and char tokenizers map each character on its own, so any chunking gives the same ids. A BPE
    is cut only where its pre-tokenizer must end a piece anyway (`bpe_cut`).
    """
    if tokenizer.kind != "bpe":
        for chunk in chunks:
            yield tokenizer.encode(chunk)
        return
    carry = ""
    for chunk in chunks:
        text = carry + chunk
        cut = bpe_cut(text, start=len(carry))  # the carry had no cut, only the new part can
        if cut == 0:  # no safe cut yet (one huge non-space run): keep reading
            carry = text
            continue
        yield tokenizer.encode(text[:cut])
        carry = text[cut:]
    if carry:
        yield tokenizer.encode(carry)


def bpe_cut(text: str, start: int = 0) -> int:
    """The last index p >= start with text[p] in " \\n" and text[p - 1] not whitespace; 0 when none.

    Why encoding text[:p] and text[p:] apart equals encoding the whole: byte-level BPE merges only
    inside the pieces of its pre-tokenizer (GPT-2's pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+|
    ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`, no look-behind). The piece holding text[p - 1] is one of the
    non-space alternatives, none of which can take the whitespace at p, so a piece ends at p in the whole
    text too; the pieces before p never look past p-1 (the only look-ahead, `(?!\\S)`, belongs to whitespace
    runs, which end before p - 1), and matching from p on does not depend on what came before.
    `str.isspace` is true for every Unicode White_Space character, so "not isspace" is never `\\s`.
    """
    p = max(text.rfind(" ", start), text.rfind("\n", start))
    while p > 0:
        if not text[p - 1].isspace():
            return p
        p = max(text.rfind(" ", start, p), text.rfind("\n", start, p))
    return 0
