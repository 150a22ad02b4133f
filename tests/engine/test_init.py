"""Initialisation schemes: the numbers match their formulas."""

import math
from typing import Any

import pytest
import torch

from worker.engine.config import ModelConfig
from worker.engine.init import activation_gain
from worker.engine.models import build_model

VOCAB, SEQ = 40, 8


def _build(**kw: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    base: dict[str, Any] = {"n_layers": 2, "d_model": 16, "hidden": 32, "context": 4, "n_heads": 2}
    base.update(kw)
    return build_model(ModelConfig(**base), VOCAB, SEQ)


def _wide_mlp(**kw: Any) -> torch.Tensor:
    """Hidden 256x256 weight of an mlp: large enough for tight std estimates."""
    model = _build(arch="mlp", d_model=32, context=8, hidden=256, **kw)
    return model.layers[1].linear.weight.detach()


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_orthogonal_recurrent_per_gate_block(arch: str) -> None:
    model = _build(arch=arch, recurrent_init="orthogonal")
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[arch]
    for layer in model.layers:
        w = layer.rnn.weight_hh_l0.detach()
        assert w.shape[0] == gates * w.shape[1]
        for block in w.chunk(gates, 0):
            assert torch.allclose(block @ block.T, torch.eye(block.shape[0]), atol=1e-5)


@pytest.mark.parametrize("init", ["default", "xavier_uniform"])
def test_forget_bias_sum(init: str) -> None:
    model = _build(arch="lstm", init=init, forget_bias=1.0)
    for layer in model.layers:
        rnn = layer.rnn
        h = rnn.hidden_size
        total = rnn.bias_ih_l0[h : 2 * h] + rnn.bias_hh_l0[h : 2 * h]
        assert torch.allclose(total, torch.ones(h))
        if init != "default":  # other gates keep the zero bias
            assert float(rnn.bias_ih_l0[:h].detach().abs().max()) == 0.0


@pytest.mark.parametrize(
    ("init", "activation", "init_gain"),
    [("kaiming_normal", "relu", 1.0), ("kaiming_uniform", "relu", 1.0), ("kaiming_normal", "tanh", 2.0),
     ("kaiming_uniform", "leaky_relu", 1.0), ("kaiming_normal", "gelu", 1.0)],
)
def test_kaiming_std_matches_formula(init: str, activation: str, init_gain: float) -> None:
    w = _wide_mlp(init=init, activation=activation, init_gain=init_gain)
    expected = init_gain * activation_gain(activation) / math.sqrt(w.shape[1])
    assert float(w.std()) == pytest.approx(expected, rel=0.03)
    assert float(w.mean()) == pytest.approx(0.0, abs=expected * 0.05)


def test_activation_gains_are_torchs() -> None:
    assert activation_gain("relu") == pytest.approx(math.sqrt(2))
    assert activation_gain("tanh") == pytest.approx(5 / 3)
    assert activation_gain("sigmoid") == 1.0
    assert activation_gain("gelu") == 1.0


def test_xavier_std_matches_formula() -> None:
    w = _wide_mlp(init="xavier_normal", activation="sigmoid")
    fan_out, fan_in = w.shape
    assert float(w.std()) == pytest.approx(math.sqrt(2.0 / (fan_in + fan_out)), rel=0.03)


@pytest.mark.parametrize("arch", ["mlp", "lstm", "transformer"])
def test_normal_std_everywhere_and_zero_biases(arch: str) -> None:
    model = _build(arch=arch, init="normal", init_std=0.05, norm="layernorm", tie_embeddings=(arch == "transformer"))
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            assert float(p.detach().std()) == pytest.approx(0.05, rel=0.15), name
        elif "norm" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
        else:
            assert torch.all(p == 0), name


def test_orthogonal_init_on_matrices() -> None:
    model = _build(arch="mlp", init="orthogonal", activation="sigmoid", hidden=32)
    w = model.layers[1].linear.weight.detach()
    assert torch.allclose(w @ w.T, torch.eye(32), atol=1e-5)


def test_default_keeps_torch_init() -> None:
    model = _build(arch="mlp")
    # torch's Linear default draws biases uniformly; an explicit scheme would zero them.
    assert float(model.layers[0].linear.bias.detach().abs().max()) > 0


def test_norms_stay_identity_under_any_init() -> None:
    model = _build(arch="transformer", init="kaiming_uniform", norm="rmsnorm", qk_norm=True)
    for m in model.modules():
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
            assert torch.all(m.weight == 1)
