"""Stacked recurrent language models (vanilla RNN, GRU, LSTM) on cuDNN-backed layers."""

from __future__ import annotations

import torch
from torch import nn

from worker.engine.config import ModelConfig
from worker.engine.models.layers import check_tie, make_norm


def make_recurrent(arch: str, in_dim: int, hidden: int, activation: str) -> nn.RNNBase:
    """One single-layer torch recurrent module (batch_first) of the given kind."""
    if arch in ("lstm", "gru") and activation != "tanh":
        raise ValueError(f"{arch} cells have fixed tanh/sigmoid nonlinearities; model.activation must be tanh")
    if arch == "lstm":
        return nn.LSTM(in_dim, hidden, num_layers=1, batch_first=True)
    if arch == "gru":
        return nn.GRU(in_dim, hidden, num_layers=1, batch_first=True)
    if arch == "rnn":
        if activation not in ("tanh", "relu"):
            raise ValueError("a vanilla rnn supports activation tanh or relu")
        return nn.RNN(in_dim, hidden, num_layers=1, nonlinearity=activation, batch_first=True)
    raise ValueError(f"unknown recurrent arch {arch!r}")


def _cpu_lacks_bf16_recurrence(x: torch.Tensor) -> bool:
    """bf16 autocast on a CPU whose oneDNN has no bf16 kernels (no AVX-512): its LSTM/GRU/RNN
    primitives refuse bf16 inputs ("could not create a primitive descriptor")."""
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not torch.ops.mkldnn._is_mkldnn_bf16_supported())


class RecurrentBlock(nn.Module):
    """One recurrent layer with optional norm (pre or post), residual and dropout."""

    def __init__(self, in_dim: int, hidden: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.residual = cfg.residual
        # Register in forward order so named_parameters() follows depth.
        if self.pre:
            self.norm = make_norm(cfg.norm, in_dim)
        self.rnn = make_recurrent(cfg.arch, in_dim, hidden, cfg.activation)
        # The skip path needs a projection when the layer changes width.
        self.proj = nn.Linear(in_dim, hidden, bias=False) if cfg.residual and in_dim != hidden else None
        if not self.pre:
            self.norm = make_norm(cfg.norm, hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, in_dim] -> [B, T, hidden]."""
        h = self._recur(self.norm(x) if self.pre else x)
        h = self.drop(h)
        if self.residual:
            h = h + (self.proj(x) if self.proj is not None else x)
        return h if self.pre else self.norm(h)

    def _recur(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_lacks_bf16_recurrence(x):
            # Such a CPU has no bf16 recurrence to be fast with: run the cell in fp32 (the rest of
            # the model keeps bf16) rather than fail every bf16 recurrent job on it.
            with torch.autocast("cpu", enabled=False):
                return self.rnn(x.float())[0]
        return self.rnn(x)[0]


class RecurrentLanguageModel(nn.Module):
    """Embedding -> n_layers recurrent blocks -> (final norm) -> head."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, seq_len: int) -> None:
        super().__init__()
        hidden = cfg.hidden
        check_tie(cfg.tie_embeddings, hidden, cfg.d_model, cfg.arch)
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        widths = [cfg.d_model] + [hidden] * cfg.n_layers
        self.layers = nn.ModuleList(RecurrentBlock(w, hidden, cfg) for w in widths[:-1])
        # Pre-norm leaves the residual stream unnormalized; normalize it once before the head.
        self.norm_f = make_norm(cfg.norm, hidden) if cfg.norm_position == "pre" else nn.Identity()
        self.head = nn.Linear(hidden, vocab_size, bias=not cfg.tie_embeddings)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, vocab], from a zero initial state."""
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm_f(x))

    def residual_branch_outputs(self) -> list[nn.Linear]:
        """None: a recurrent branch ends in its gated cell, with no projection to scale."""
        return []

    def layer_names(self) -> list[str]:
        """Weight matrices in depth order (input-to-hidden before hidden-to-hidden)."""
        return [n for n, p in self.named_parameters() if p.dim() >= 2]
