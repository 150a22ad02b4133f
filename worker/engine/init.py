"""Weight initialisation per ModelConfig (init, init_std, init_gain, recurrent_init, forget_bias)."""

from __future__ import annotations

import math

import torch
from torch import nn

from worker.engine.config import ModelConfig

# Norm layers keep weight 1 and bias 0 whatever the init scheme.
_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm1d)
_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}
LEAKY_SLOPE = 0.01  # nn.LeakyReLU's default negative slope


def activation_gain(activation: str) -> float:
    """torch's recommended gain for the activation; 1 ('linear') where torch has none."""
    if activation == "leaky_relu":
        return nn.init.calculate_gain("leaky_relu", LEAKY_SLOPE)
    if activation in ("relu", "tanh", "sigmoid"):
        return nn.init.calculate_gain(activation)
    # gelu/silu/elu: torch gives no gain; treat as linear rather than guess.
    return 1.0


def _kaiming_(w: torch.Tensor, gain: float, uniform: bool) -> None:
    """He init with an explicit gain: std = gain / sqrt(fan_in)."""
    fan_in = w.shape[1] * (w[0][0].numel() if w.dim() > 2 else 1)
    std = gain / math.sqrt(fan_in)
    if uniform:
        bound = math.sqrt(3.0) * std
        w.uniform_(-bound, bound)
    else:
        w.normal_(0.0, std)


def init_matrix_(w: torch.Tensor, cfg: ModelConfig) -> None:
    """Initialise one weight matrix (or gate block) in place per cfg.init."""
    gain = cfg.init_gain * activation_gain(cfg.activation)
    scheme = cfg.init
    if scheme == "xavier_uniform":
        nn.init.xavier_uniform_(w, gain=gain)
    elif scheme == "xavier_normal":
        nn.init.xavier_normal_(w, gain=gain)
    elif scheme == "kaiming_uniform":
        _kaiming_(w, gain, uniform=True)
    elif scheme == "kaiming_normal":
        _kaiming_(w, gain, uniform=False)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(w, gain=gain)
    elif scheme == "normal":
        nn.init.normal_(w, mean=0.0, std=cfg.init_std)
    else:
        raise ValueError(f"unknown init {scheme!r}")


def _blocks(module: nn.Module, name: str, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gate blocks of a recurrent weight (each gate its own matrix); else the whole tensor."""
    for cls, gates in _GATES.items():
        if isinstance(module, cls) and name.startswith("weight_"):
            return p.chunk(gates, dim=0)
    return (p,)


def _init_all(model: nn.Module, cfg: ModelConfig) -> None:
    """cfg.init on every weight matrix, zero biases, identity norms."""
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights: the first owner (the embedding) decides
                continue
            seen.add(id(p))
            if isinstance(module, _NORMS):
                p.fill_(1.0 if name == "weight" else 0.0)
            elif p.dim() >= 2:
                for block in _blocks(module, name, p):
                    init_matrix_(block, cfg)
            else:
                p.zero_()


def _recurrent_modules(model: nn.Module) -> list[nn.RNNBase]:
    """Every torch recurrent module in the model."""
    return [m for m in model.modules() if isinstance(m, (nn.LSTM, nn.GRU, nn.RNN))]


def _orthogonal_recurrent(model: nn.Module) -> None:
    """Hidden-to-hidden weights orthogonal per gate block (spectral radius 1)."""
    for m in _recurrent_modules(model):
        for name, p in m.named_parameters(recurse=False):
            if name.startswith("weight_hh"):
                for block in _blocks(m, name, p):
                    nn.init.orthogonal_(block)


def _set_forget_bias(model: nn.Module, value: float) -> None:
    """LSTM forget-gate bias (gate order i, f, g, o), split evenly over bias_ih and bias_hh."""
    for m in _recurrent_modules(model):
        if not isinstance(m, nn.LSTM):
            continue
        h = m.hidden_size
        for name, p in m.named_parameters(recurse=False):
            if name.startswith("bias_"):
                p[h : 2 * h].fill_(value / 2)


@torch.no_grad()
def initialize(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Initialise `model` in place per `cfg`; 'default' keeps torch's own init."""
    if cfg.init != "default":
        _init_all(model, cfg)
    if cfg.recurrent_init == "orthogonal":
        _orthogonal_recurrent(model)
    if cfg.forget_bias != 0.0:
        _set_forget_bias(model, cfg.forget_bias)
    return model
