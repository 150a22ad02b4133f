"""Token stream, train/validation split and random training windows."""

from __future__ import annotations

import math
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


class TokenData:
    """A 1-D token stream split into a train head and a contiguous validation tail."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, val_fraction: float) -> None:
        if tokens.dim() != 1:
            raise DataError("tokens must be a 1-D tensor")
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.tokens = tokens.long()
        self.seq_len = seq_len
        self.val_fraction = val_fraction
        n = self.tokens.numel()
        self.n_val = _val_count(n, val_fraction)
        self.n_train = n - self.n_val
        window = seq_len + 1
        if self.n_train < window or self.n_val < window:
            raise DataError(_too_short_message(n, seq_len, val_fraction))
        self._offsets = torch.arange(window, device=self.tokens.device)

    def to(self, device: torch.device | str) -> TokenData:
        """Same data with the token stream on `device` (batches are gathered there)."""
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
        idx = starts.to(self.tokens.device).unsqueeze(1) + self._offsets
        windows = self.tokens[idx]
        return windows[:, :-1], windows[:, 1:], starts

    def excerpt(self, offset: int, n_tokens: int) -> list[int]:
        """The token ids of the stream from `offset` on (at most n_tokens)."""
        return self.tokens[offset:offset + n_tokens].tolist()


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
