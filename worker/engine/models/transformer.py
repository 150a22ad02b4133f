"""GPT-style decoder-only transformer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.config import ModelConfig
from worker.engine.models.layers import make_activation, make_norm


def _qk_norm(cfg: ModelConfig, head_dim: int) -> nn.Module:
    """Per-head norm for q and k: rmsnorm if the model uses it, else layernorm."""
    if not cfg.qk_norm:
        return nn.Identity()
    return make_norm("rmsnorm" if cfg.norm == "rmsnorm" else "layernorm", head_dim)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention over scaled_dot_product_attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.q_norm = _qk_norm(cfg, self.head_dim)
        self.k_norm = _qk_norm(cfg, self.head_dim)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d] -> [B, T, d]."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        # QK-norm bounds the attention logits (Wortsman et al. 2023).
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))


class FeedForward(nn.Module):
    """Position-wise MLP of width model.hidden (4 * d_model unless set)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.hidden
        self.fc = nn.Linear(cfg.d_model, hidden)
        self.act = make_activation(cfg.activation)
        self.proj = nn.Linear(hidden, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d] -> [B, T, d]."""
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Attention then MLP, each with norm (pre or post) and optional residual."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.residual = cfg.residual
        # Register in forward order so named_parameters() follows depth.
        if self.pre:
            self.norm1 = make_norm(cfg.norm, cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        if not self.pre:
            self.norm1 = make_norm(cfg.norm, cfg.d_model)
        if self.pre:
            self.norm2 = make_norm(cfg.norm, cfg.d_model)
        self.mlp = FeedForward(cfg)
        if not self.pre:
            self.norm2 = make_norm(cfg.norm, cfg.d_model)

    def _sub(self, x: torch.Tensor, f: nn.Module, norm: nn.Module) -> torch.Tensor:
        """One sublayer: pre x(+)f(norm(x)) or post norm(x(+)f(x))."""
        if self.pre:
            h = f(norm(x))
            return x + h if self.residual else h
        h = f(x)
        return norm(x + h if self.residual else h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d] -> [B, T, d]."""
        x = self._sub(x, self.attn, self.norm1)
        return self._sub(x, self.mlp, self.norm2)


class TransformerLanguageModel(nn.Module):
    """Token + learned position embeddings -> blocks -> final norm -> head."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"model.n_heads ({cfg.n_heads}) must divide model.d_model ({cfg.d_model})")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.residual = cfg.residual
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        # Post-norm blocks already end normalized; pre-norm leaves the residual stream raw.
        self.norm_f = make_norm(cfg.norm, cfg.d_model) if cfg.norm_position == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] (T <= seq_len) -> logits [B, T, vocab]."""
        T = idx.shape[1]
        if T > self.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds seq_len {self.seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_f(x))

    def residual_branch_outputs(self) -> list[nn.Linear]:
        """The projection that ends each attention and FFN branch (for depth-scaled init)."""
        return [layer for b in self.blocks for layer in (b.attn.proj, b.mlp.proj)] if self.residual else []

    def layer_names(self) -> list[str]:
        """Weight matrices in depth order."""
        return [n for n, p in self.named_parameters() if p.dim() >= 2]
