"""Every architecture: shapes, finite gradients, causality, layer order, tying."""

from typing import Any

import pytest
import torch

from worker.engine.config import ModelConfig
from worker.engine.models import build_model

VOCAB, SEQ = 23, 12

VARIANTS: list[dict[str, Any]] = [
    {"arch": "mlp"},
    {"arch": "mlp", "norm": "batchnorm", "activation": "sigmoid"},
    {"arch": "mlp", "norm": "layernorm", "residual": True, "dropout": 0.1},
    {"arch": "mlp", "norm": "rmsnorm", "hidden": 16, "tie_embeddings": True, "context": 1},
    {"arch": "rnn", "activation": "tanh"},
    {"arch": "rnn", "activation": "relu", "norm": "layernorm", "residual": True},
    {"arch": "gru", "norm": "rmsnorm", "norm_position": "post", "residual": True},
    {"arch": "gru", "hidden": 16, "tie_embeddings": True, "dropout": 0.1},
    {"arch": "lstm"},
    {"arch": "lstm", "norm": "layernorm", "residual": True, "n_layers": 3},
    {"arch": "lstm", "norm": "rmsnorm", "norm_position": "post", "hidden": 16, "tie_embeddings": True},
    {"arch": "transformer", "norm": "layernorm"},
    {"arch": "transformer", "norm": "rmsnorm", "qk_norm": True, "residual": True},
    {"arch": "transformer", "norm": "layernorm", "norm_position": "post", "residual": True},
    {"arch": "transformer", "norm": "none", "residual": False, "qk_norm": True, "activation": "gelu"},
    {"arch": "transformer", "norm": "layernorm", "residual": True, "tie_embeddings": True, "dropout": 0.1},
]


def _cfg(**kw: Any) -> ModelConfig:
    base: dict[str, Any] = {"n_layers": 2, "d_model": 16, "hidden": 24, "context": 4, "n_heads": 2}
    base.update(kw)
    return ModelConfig(**base)


def _ids(v: dict[str, Any]) -> str:
    return "-".join(f"{k}={val}" for k, val in v.items())


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_shapes_and_finite_grads(variant: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(**variant), VOCAB, SEQ)
    model.train()
    for T in (1, 5, SEQ):
        idx = torch.randint(0, VOCAB, (3, T))
        logits = model(idx)
        assert logits.shape == (3, T, VOCAB)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), idx.reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def _assert_causal(model: torch.nn.Module) -> None:
    idx = torch.randint(0, VOCAB, (2, SEQ))
    changed = idx.clone()
    t = SEQ // 2
    changed[:, t:] = (changed[:, t:] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-5)
    assert not torch.allclose(a[:, t:], b[:, t:])  # the change does reach later positions


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_causal(variant: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(**variant), VOCAB, SEQ)
    model.eval()
    _assert_causal(model)
    # Training mode too, where its statistics do not mix positions (batchnorm does) and no dropout.
    if variant.get("norm") != "batchnorm" and not variant.get("dropout"):
        model.train()
        _assert_causal(model)


def test_layer_names_follow_depth() -> None:
    lstm = build_model(_cfg(arch="lstm"), VOCAB, SEQ)
    assert lstm.layer_names() == [
        "embed.weight",
        "layers.0.rnn.weight_ih_l0",
        "layers.0.rnn.weight_hh_l0",
        "layers.1.rnn.weight_ih_l0",
        "layers.1.rnn.weight_hh_l0",
        "head.weight",
    ]
    mlp = build_model(_cfg(arch="mlp", n_layers=3), VOCAB, SEQ)
    assert mlp.layer_names() == [
        "embed.weight",
        "layers.0.linear.weight",
        "layers.1.linear.weight",
        "layers.2.linear.weight",
        "head.weight",
    ]
    gpt = build_model(_cfg(arch="transformer", norm="layernorm"), VOCAB, SEQ)
    names = gpt.layer_names()
    assert names[:4] == ["tok_emb.weight", "pos_emb.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight"]
    assert names[-1] == "head.weight"
    assert names.index("blocks.0.mlp.proj.weight") < names.index("blocks.1.attn.qkv.weight")


@pytest.mark.parametrize("arch", ["mlp", "rnn", "gru", "lstm", "transformer"])
def test_layer_names_are_exactly_the_matrices_in_order(arch: str) -> None:
    model = build_model(_cfg(arch=arch, norm="layernorm", residual=True), VOCAB, SEQ)
    expected = [n for n, p in model.named_parameters() if p.dim() >= 2]
    assert model.layer_names() == expected
    assert len(set(expected)) == len(expected)


def test_rnn_residual_projects_when_widths_differ() -> None:
    model = build_model(_cfg(arch="gru", residual=True, d_model=16, hidden=24), VOCAB, SEQ)
    assert model.layers[0].proj is not None and model.layers[1].proj is None


def test_tied_weights_share_storage() -> None:
    gpt = build_model(_cfg(arch="transformer", tie_embeddings=True), VOCAB, SEQ)
    assert gpt.head.weight is gpt.tok_emb.weight
    lstm = build_model(_cfg(arch="lstm", hidden=16, tie_embeddings=True), VOCAB, SEQ)
    assert lstm.head.weight is lstm.embed.weight


@pytest.mark.parametrize("arch", ["mlp", "rnn", "gru", "lstm"])
def test_tie_needs_matching_width(arch: str) -> None:
    with pytest.raises(ValueError, match="tie_embeddings"):
        build_model(_cfg(arch=arch, hidden=24, d_model=16, tie_embeddings=True), VOCAB, SEQ)


def test_transformer_rejects_too_long_input() -> None:
    gpt = build_model(_cfg(arch="transformer"), VOCAB, SEQ)
    with pytest.raises(ValueError, match="seq_len"):
        gpt(torch.zeros(1, SEQ + 1, dtype=torch.long))
