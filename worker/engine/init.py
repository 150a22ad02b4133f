"""Weight initialisation per ModelConfig (init, init_std, init_gain, recurrent_init, forget_bias,
depth_scaled_init). Hidden matrices take the scheme with the activation's gain; embeddings and the
output head have their own rules (no activation gain)."""

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


def init_matrix_(w: torch.Tensor, scheme: str, gain: float, std: float) -> None:
    """Initialise one weight matrix (or gate block) in place per the scheme (`std`: for normal)."""
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
        nn.init.normal_(w, mean=0.0, std=std)
    else:
        raise ValueError(f"unknown init {scheme!r}")


def _blocks(module: nn.Module, name: str, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gate blocks of a recurrent weight (each gate its own matrix); else the whole tensor."""
    for cls, gates in _GATES.items():
        if isinstance(module, cls) and name.startswith("weight_"):
            return p.chunk(gates, dim=0)
    return (p,)


def _is_recurrent_hh(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.RNNBase) and name.startswith("weight_hh")


def _matrix_gain(module: nn.Module, name: str, cfg: ModelConfig) -> float:
    """init_gain times the activation's gain, except on an orthogonal recurrent matrix: its
    singular values stay at init_gain (1 by default), as a tanh gain would make the recurrence explode."""
    if cfg.init == "orthogonal" and _is_recurrent_hh(module, name):
        return cfg.init_gain
    return cfg.init_gain * activation_gain(cfg.activation)


def _init_hidden(module: nn.Module, cfg: ModelConfig) -> None:
    """cfg.init on a module's own weight matrices, zero biases, identity norms."""
    for name, p in module.named_parameters(recurse=False):
        if isinstance(module, _NORMS):
            p.fill_(1.0 if name == "weight" else 0.0)
        elif p.dim() >= 2:
            gain = _matrix_gain(module, name, cfg)
            for block in _blocks(module, name, p):
                init_matrix_(block, cfg.init, gain, cfg.init_std)
        else:
            p.zero_()


def embedding_std(cfg: ModelConfig) -> float:
    """init normal: init_std. Otherwise N(0, 1) as torch does, except a table tied to the head:
    1/sqrt(d_model), so the initial logits (hidden . embedding) have std ~1, not ~sqrt(d_model)."""
    if cfg.init == "normal":
        return cfg.init_std
    return 1.0 / math.sqrt(cfg.d_model) if cfg.tie_embeddings else 1.0


def _init_embedding(embedding: nn.Embedding, cfg: ModelConfig) -> None:
    """Every table (tokens, positions) at embedding_std: positions never drown the tokens.
    N(0, 1) is what torch already drew, so that case is left as it is."""
    std = embedding_std(cfg)
    if std != 1.0:
        nn.init.normal_(embedding.weight, 0.0, std)


def _init_head(head: nn.Module, cfg: ModelConfig) -> None:
    """An untied output head: fan-in scaled (std 1/sqrt(fan_in); init_std for normal), no activation
    gain since no activation follows it; zero bias. A tied head is its embedding's."""
    if cfg.tie_embeddings or not isinstance(head, nn.Linear):
        return
    std = cfg.init_std if cfg.init == "normal" else 1.0 / math.sqrt(head.in_features)
    nn.init.normal_(head.weight, 0.0, std)
    if head.bias is not None:
        head.bias.zero_()


def _init_modules(model: nn.Module, cfg: ModelConfig) -> None:
    """Each module by its role, in depth order (so a scheme draws in the same order for every role)."""
    head = model.get_submodule("head")
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            _init_embedding(module, cfg)
        elif cfg.init == "default":  # torch's own init for the rest
            continue
        elif module is head:
            _init_head(head, cfg)
        else:
            _init_hidden(module, cfg)


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


def depth_scale(cfg: ModelConfig) -> float:
    """GPT-2's residual scaling: each of the 2 * n_layers branches adds variance to the stream."""
    return 1.0 / math.sqrt(2 * cfg.n_layers)


def _scale_residual_branches(model: nn.Module, cfg: ModelConfig) -> None:
    """The last weight matrix of every residual branch, times depth_scale(cfg)."""
    for layer in model.residual_branch_outputs():  # type: ignore[operator]
        layer.weight.mul_(depth_scale(cfg))


@torch.no_grad()
def initialize(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Initialise `model` in place per `cfg`.

    'default' keeps torch's own init for the hidden layers and the head; the embedding rule
    (a tied table at 1/sqrt(d_model)), recurrent_init, forget_bias and depth_scaled_init apply
    under every scheme.
    """
    _init_modules(model, cfg)
    if cfg.recurrent_init == "orthogonal":
        _orthogonal_recurrent(model)
    if cfg.forget_bias != 0.0:
        _set_forget_bias(model, cfg.forget_bias)
    if cfg.depth_scaled_init:
        _scale_residual_branches(model, cfg)
    return model
