"""Deep feed-forward next-token model over a fixed window of previous tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.config import ModelConfig
from worker.engine.models.layers import TiedHead, check_tie, make_activation, make_norm


class MLPBlock(nn.Module):
    """Linear -> activation -> dropout, with norm (pre or post) and an optional residual."""

    def __init__(self, in_dim: int, out_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.residual = cfg.residual
        # Register in forward order so named_parameters() follows depth.
        if self.pre:
            self.norm = make_norm(cfg.norm, in_dim)
        self.linear = nn.Linear(in_dim, out_dim)
        self.act = make_activation(cfg.activation)
        # The skip path needs a projection when the block changes width.
        self.proj = nn.Linear(in_dim, out_dim, bias=False) if cfg.residual and in_dim != out_dim else None
        if not self.pre:
            self.norm = make_norm(cfg.norm, out_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_dim] -> [N, out_dim]: pre x(+)f(norm(x)), post norm(x(+)f(x))."""
        h = self.drop(self.act(self.linear(self.norm(x) if self.pre else x)))
        if self.residual:
            h = h + (self.proj(x) if self.proj is not None else x)
        return h if self.pre else self.norm(h)


class MLPLanguageModel(nn.Module):
    """Embeds the last `context` tokens, concatenates them, and predicts the next."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        hidden = cfg.hidden
        check_tie(cfg.tie_embeddings, hidden, cfg.d_model, "mlp")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.context = cfg.context
        # Positions before the start of the sequence read an extra padding token.
        self.pad_id = vocab_size
        self.embed = nn.Embedding(vocab_size + 1, cfg.d_model)
        widths = [cfg.context * cfg.d_model] + [hidden] * cfg.n_layers
        self.layers = nn.ModuleList(MLPBlock(a, b, cfg) for a, b in zip(widths[:-1], widths[1:], strict=True))
        # Pre-norm leaves the last block's output unnormalized; normalize it once before the head.
        self.norm_f = make_norm(cfg.norm, hidden) if cfg.norm_position == "pre" else nn.Identity()
        self.head: nn.Module
        if cfg.tie_embeddings:
            self.head = TiedHead(self.embed, vocab_size)
        else:
            self.head = nn.Linear(hidden, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, vocab]; position t sees tokens t-context+1..t."""
        B, T = idx.shape
        padded = F.pad(idx, (self.context - 1, 0), value=self.pad_id)
        windows = padded.unfold(1, self.context, 1)  # [B, T, context], no loop over T
        x = self.embed(windows).reshape(B * T, -1)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm_f(x)).view(B, T, self.vocab_size)

    def residual_branch_outputs(self) -> list[nn.Linear]:
        """The linear map of each residual block's branch (for depth-scaled init)."""
        return [layer.linear for layer in self.layers if layer.residual]

    def layer_names(self) -> list[str]:
        """Weight matrices in depth order."""
        return [n for n, p in self.named_parameters() if p.dim() >= 2]
