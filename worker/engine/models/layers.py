"""Small factories shared by the model files: activations, norms, tied heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
}

NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm1d)


def make_activation(name: str) -> nn.Module:
    """Activation module by spec name."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}") from None


def make_norm(kind: str, dim: int) -> nn.Module:
    """Norm over the last dim by spec name; 'none' is the identity."""
    if kind == "none":
        return nn.Identity()
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim)
    if kind == "batchnorm":
        return nn.BatchNorm1d(dim)
    raise ValueError(f"unknown norm {kind!r}")


def check_tie(tie: bool, last_width: int, d_model: int, arch: str) -> None:
    """Refuse tie_embeddings when the head's input width differs from d_model."""
    if tie and last_width != d_model:
        raise ValueError(
            f"tie_embeddings needs the last hidden width of the {arch} ({last_width}) "
            f"to equal model.d_model ({d_model}); set model.hidden = model.d_model or untie"
        )


class TiedHead(nn.Module):
    """Output head that reuses the first `vocab_size` rows of an embedding table."""

    def __init__(self, embedding: nn.Embedding, vocab_size: int) -> None:
        super().__init__()
        # A plain attribute list keeps the embedding out of this module's parameters,
        # so it is registered (and counted) once, at the input.
        self._embedding = [embedding]
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from hidden states by the transposed embedding."""
        return F.linear(x, self._embedding[0].weight[: self.vocab_size])
