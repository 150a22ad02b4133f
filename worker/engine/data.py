"""Token stream, train/validation split and random training windows."""

from __future__ import annotations

import math
import os
import threading
import weakref
from pathlib import Path
from typing import Literal

import torch

from worker.engine.tokenizers import AnyTokenizer


class DataError(ValueError):
    """A corpus that cannot feed training (empty, or too short for seq_len)."""


def _val_count(n_tokens: int, val_fraction: float) -> int:
    """Tokens in the validation tail: the last `val_fraction` of the stream."""
    return int(n_tokens * val_fraction)


def min_tokens(seq_len: int, val_fraction: float) -> int:
    """Fewest tokens that give both splits one window of seq_len + 1 tokens."""
    window = seq_len + 1
    n = max(2 * window, math.ceil(window / val_fraction))
    # Float rounding in the split can need a token or two more than the formula.
    while _val_count(n, val_fraction) < window or n - _val_count(n, val_fraction) < window:
        n += 1
    return n


# Dtypes of a memory-mapped token file; a stream in one of them stays on the host and each batch is
# widened to int64 (and moved to the training device) after the gather.
COMPACT_DTYPES = (torch.uint16, torch.uint32)


class TokenData:
    """A 1-D token stream split into a train head and a contiguous validation tail.

    `tokens` is an int64 tensor (in memory, on any device) or a memory-mapped uint16/uint32 one
    (`from_token_file`): the latter stays on the host, and only the drawn windows are read from it.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, val_fraction: float,
                 device: torch.device | str | None = None, reader: WindowReader | None = None) -> None:
        if tokens.dim() != 1:
            raise DataError("tokens must be a 1-D tensor")
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.tokens = tokens if tokens.dtype in COMPACT_DTYPES else tokens.long()
        self._reader = reader  # positional reads of the windows from the token file behind `tokens`
        self.device = torch.device(device) if device is not None else self.tokens.device
        self.seq_len = seq_len
        self.val_fraction = val_fraction
        n = self.tokens.numel()
        self.n_val = _val_count(n, val_fraction)
        self.n_train = n - self.n_val
        window = seq_len + 1
        if self.n_train < window or self.n_val < window:
            raise DataError(_too_short_message(n, seq_len, val_fraction))
        self._offsets = torch.arange(window, device=self.tokens.device)
        # Every window as a row of a strided view (no copy): a batch of a mapped stream without a reader
        # is one index_select of rows, faster than a 2-D gather.
        self._windows = (self.tokens.as_strided((n - window + 1, window), (1, 1))
                         if self.tokens.dtype in COMPACT_DTYPES else None)

    @classmethod
    def from_token_file(cls, path: Path, dtype: torch.dtype, n_tokens: int, seq_len: int,
                        val_fraction: float) -> TokenData:
        """A stream memory-mapped from a raw token file (native byte order, `n_tokens` of `dtype`).

        `tokens` maps the file (private, never written; read for excerpts and checks), while batches
        read their windows with positional reads (`WindowReader`): a page fault on the mapping maps
        the memory around the window too (fault-around over the page cache's large folios: ~160 kB to
        2 MB per window measured on Linux 6.18, even with MADV_RANDOM), so batches through the mapping
        make the process's RSS grow toward the file's size, and dropping the pages now and then
        (MADV_DONTNEED) costs more in re-faults than pread does; pread keeps RSS flat at the in-memory
        stream's speed (bench/data_speed.py). The page cache still holds the hot parts of the file for
        every process.
        """
        if dtype not in COMPACT_DTYPES:
            raise DataError(f"token files hold uint16 or uint32, not {dtype}")
        if n_tokens < 1:
            raise DataError(_too_short_message(0, seq_len, val_fraction))
        tokens = torch.from_file(str(path), shared=False, size=n_tokens, dtype=dtype)
        reader = WindowReader(path, dtype, seq_len + 1) if hasattr(os, "pread") else None
        return cls(tokens, seq_len, val_fraction, reader=reader)

    def to(self, device: torch.device | str) -> TokenData:
        """Same data with batches delivered on `device`.

        An in-memory stream moves there (a batch is a gather on the device, not a copy); a memory-mapped
        one stays on the host and each gathered batch is copied over.
        """
        if self.tokens.dtype in COMPACT_DTYPES:
            return TokenData(self.tokens, self.seq_len, self.val_fraction, device=device, reader=self._reader)
        return TokenData(self.tokens.to(device), self.seq_len, self.val_fraction)

    def batch(
        self, split: Literal["train", "val"], batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows (x, y) of shape [B, seq_len], y = x shifted by one token."""
        x, y, _ = self.batch_with_offsets(split, batch_size, generator)
        return x, y

    def batch_with_offsets(
        self, split: Literal["train", "val"], batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, offsets): `batch` plus each window's start in the token stream (for attribution)."""
        if split == "train":
            lo, hi = 0, self.n_train - self.seq_len - 1
        elif split == "val":
            lo, hi = self.n_train, self.tokens.numel() - self.seq_len - 1
        else:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        # Draw on the generator's device so the same generator state gives the same batch.
        starts = torch.randint(lo, hi + 1, (batch_size,), generator=generator, device=generator.device)
        if self._reader is not None:
            windows = _to_device(self._reader.read(starts.tolist()), self.device)
        elif self._windows is not None:
            windows = _to_device(self._windows.index_select(0, starts.cpu()).long(), self.device)
        else:
            idx = starts.to(self.tokens.device).unsqueeze(1) + self._offsets
            windows = self.tokens[idx]
        return windows[:, :-1], windows[:, 1:], starts

    def excerpt(self, offset: int, n_tokens: int) -> list[int]:
        """The token ids of the stream from `offset` on (at most n_tokens)."""
        return self.tokens[offset:offset + n_tokens].tolist()


class WindowReader:
    """Reads windows of `window` ids at given token offsets from a token file, one `os.pread` per window.

    A system call per window is the floor (the stdlib has no vectored read of scattered offsets), so the
    rest of a batch is kept to one join, one copy into a buffer reused per batch size and one widening
    copy to int64: about as fast as a gather from an in-memory int64 tensor (bench/data_speed.py), where
    copying each row into a slice of a new buffer and wrapping that was 0.74-0.78 x as fast. Buffers are
    per thread, so TokenData copies (`.to`) sharing this reader may draw from several threads.
    """

    def __init__(self, path: Path, dtype: torch.dtype, window: int) -> None:
        self.path = path
        self._fd = _open_for_reads(path)
        weakref.finalize(self, os.close, self._fd)  # closed with the last TokenData sharing this reader
        self.dtype = dtype
        self.width = window * dtype.itemsize
        self._itemsize = dtype.itemsize
        self._local = threading.local()  # .buffers: {n_rows: (memoryview of a bytearray, its [n_rows, window] view)}

    def read(self, starts: list[int]) -> torch.Tensor:
        """[len(starts), window] ids widened to int64 (a new tensor: the read buffer is reused)."""
        fd, width, itemsize, pread = self._fd, self.width, self._itemsize, os.pread
        data = b"".join([pread(fd, width, start * itemsize) for start in starts])
        try:
            buffer, ids = self._local.buffers[len(starts)]
        except (AttributeError, KeyError):
            buffer, ids = self._new_buffer(len(starts))
        if len(data) != len(buffer):  # a short read: a window runs past the end of the file
            raise DataError(f"token file {self.path} ends before offset {max(starts)} + window")
        buffer[:] = data
        return ids.long()

    def _new_buffer(self, n_rows: int) -> tuple[memoryview, torch.Tensor]:
        """This thread's reusable buffer of n_rows windows and its [n_rows, window] tensor view.

        The memoryview is what `read` copies into: assigning to it is a plain copy of the same size, faster
        than a bytearray's slice assignment (which may resize).
        """
        buffer = bytearray(self.width * n_rows)
        buffers = self._local.__dict__.setdefault("buffers", {})
        buffers[n_rows] = memoryview(buffer), torch.frombuffer(buffer, dtype=self.dtype).view(n_rows, -1)
        return buffers[n_rows]


def _open_for_reads(path: Path) -> int:
    """A read-only descriptor; without access-time updates where allowed (the owner's files on Linux),
    which takes ~13% off each small pread (measured on ext4 with relatime)."""
    noatime = getattr(os, "O_NOATIME", 0)
    if noatime:
        try:
            return os.open(path, os.O_RDONLY | noatime)
        except PermissionError:  # O_NOATIME needs the file's owner (or CAP_FOWNER)
            pass
    return os.open(path, os.O_RDONLY)


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`; through pinned memory to a GPU, so the copy does not wait on the host."""
    if device.type == "cpu":
        return batch
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def _too_short_message(n_tokens: int, seq_len: int, val_fraction: float) -> str:
    """Say how many tokens there are and how many are needed."""
    have = "corpus is empty" if n_tokens == 0 else f"corpus has {n_tokens} tokens"
    need = min_tokens(seq_len, val_fraction)
    pct = f"{val_fraction * 100:g}%"
    return f"{have}; seq_len {seq_len} needs at least {need} (train + {pct} validation)"


def load_text_data(text: str, tokenizer: AnyTokenizer, seq_len: int, val_fraction: float) -> TokenData:
    """Tokenize a corpus into TokenData; raise DataError if it is empty or too short."""
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}")
    ids = tokenizer.encode(text)
    if not ids:
        raise DataError(_too_short_message(0, seq_len, val_fraction))
    return TokenData(torch.tensor(ids, dtype=torch.long), seq_len, val_fraction)
