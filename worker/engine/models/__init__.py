"""Model zoo: build any spec'd architecture, initialised per its config."""

from __future__ import annotations

import dataclasses

from torch import nn

from worker.engine.config import ModelConfig, resolve_model_defaults
from worker.engine.init import initialize
from worker.engine.models.mlp import MLPLanguageModel
from worker.engine.models.rnn import RecurrentLanguageModel
from worker.engine.models.transformer import TransformerLanguageModel

__all__ = ["build_model", "MLPLanguageModel", "RecurrentLanguageModel", "TransformerLanguageModel"]


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int) -> nn.Module:
    """Model for `cfg.arch`, initialised per `cfg`; ValueError for an impossible config.

    Null `hidden`/`residual` (a config not made by parse_spec) get the architecture's defaults.
    """
    cfg = resolve_model_defaults(dataclasses.replace(cfg))
    if cfg.arch == "mlp":
        model: nn.Module = MLPLanguageModel(cfg, vocab_size, seq_len)
    elif cfg.arch in ("rnn", "gru", "lstm"):
        model = RecurrentLanguageModel(cfg, vocab_size, seq_len)
    elif cfg.arch == "transformer":
        model = TransformerLanguageModel(cfg, vocab_size, seq_len)
    else:
        raise ValueError(f"unknown model.arch {cfg.arch!r}")
    initialize(model, cfg)
    return model
