"""Initialisation schemes: the numbers match their formulas."""

import math
from typing import Any

import pytest
import torch

from worker.engine.config import ModelConfig, parse_spec
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


def _std(t: torch.Tensor) -> float:
    return float(t.detach().std())


def _spec_model(**model: Any) -> torch.nn.Module:
    """A model built the way the trainer builds it (parse_spec resolves the defaults), seed 0."""
    cfg = parse_spec({"model": model, "training": {"seq_len": 64}}).model
    torch.manual_seed(0)
    return build_model(cfg, 256, 64)


def _logit_std(model: torch.nn.Module) -> float:
    idx = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float(model(idx).std())


TIE_CASES = [
    {"arch": "transformer"},
    {"arch": "transformer", "norm": "layernorm"},
    {"arch": "transformer", "norm": "rmsnorm", "d_model": 128, "n_heads": 8},
    {"arch": "lstm", "hidden": 64, "norm": "layernorm"},
    {"arch": "lstm", "hidden": 64},
    {"arch": "gru", "hidden": 64},
    {"arch": "rnn", "hidden": 64},
    {"arch": "mlp", "hidden": 64},
]


@pytest.mark.parametrize("model", TIE_CASES, ids=lambda m: "-".join(map(str, m.values())))
@pytest.mark.parametrize("tie", [False, True])
def test_initial_logits_are_not_blown_up(model: dict[str, Any], tie: bool) -> None:
    # A tied N(0, 1) table made logits of std ~sqrt(d_model) (~8.5 for this transformer).
    std = _logit_std(_spec_model(**model, tie_embeddings=tie))
    if model.get("norm", "none") != "none":  # the head reads a normalized stream: std ~1
        assert 0.5 <= std <= 2.0
    else:  # small (tanh-bounded or unnormalized) hidden states: small logits, near-uniform first predictions
        assert 0.01 <= std <= 2.0


def test_tied_table_std_is_inverse_sqrt_d_model() -> None:
    tied = _spec_model(arch="transformer", d_model=64, tie_embeddings=True)
    assert _std(tied.tok_emb.weight) == pytest.approx(1 / 8, rel=0.05)
    # positions at the token table's scale, so they do not drown the tokens
    assert _std(tied.pos_emb.weight) == pytest.approx(1 / 8, rel=0.1)
    untied = _spec_model(arch="transformer", d_model=64)
    assert _std(untied.tok_emb.weight) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("init", ["xavier_normal", "kaiming_normal", "orthogonal"])
def test_no_activation_gain_on_embeddings_or_head(init: str) -> None:
    model = _spec_model(arch="mlp", d_model=64, hidden=128, activation="relu", init=init)
    assert _std(model.embed.weight) == pytest.approx(1.0, rel=0.05)
    head = model.head.weight
    assert _std(head) == pytest.approx(1 / math.sqrt(head.shape[1]), rel=0.05)
    assert float(model.head.bias.detach().abs().max()) == 0.0
    # while the hidden matrices do carry relu's gain
    hidden = model.layers[1].linear.weight
    gained = {"xavier_normal": math.sqrt(2) * math.sqrt(2 / 256), "kaiming_normal": math.sqrt(2) / math.sqrt(128),
              "orthogonal": math.sqrt(2) / math.sqrt(128)}[init]
    assert _std(hidden) == pytest.approx(gained, rel=0.05)


@pytest.mark.parametrize(("arch", "n_layers"), [("transformer", 2), ("transformer", 6), ("mlp", 3)])
def test_depth_scaled_init_ratio(arch: str, n_layers: int) -> None:
    model_spec = {"arch": arch, "n_layers": n_layers, "d_model": 32, "residual": True}
    plain = dict(_spec_model(**model_spec).named_parameters())
    scaled_model = _spec_model(**model_spec, depth_scaled_init=True)
    scaled = dict(scaled_model.named_parameters())
    branch_ends = {id(layer.weight) for layer in scaled_model.residual_branch_outputs()}
    assert len(branch_ends) == (2 * n_layers if arch == "transformer" else n_layers)
    expected = 1 / math.sqrt(2 * n_layers)
    for name, p in scaled.items():
        if p.numel() == 1 or _std(plain[name]) == 0:  # biases at zero, norm gains at one
            assert torch.equal(p, plain[name]), name
            continue
        ratio = _std(p) / _std(plain[name])
        if id(p) in branch_ends:
            assert ratio == pytest.approx(expected, rel=1e-5), name
        else:
            assert ratio == pytest.approx(1.0, rel=1e-6), name  # nothing else moves


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("spec", [{"init": "orthogonal"}, {"recurrent_init": "orthogonal"},
                                  {"init": "xavier_uniform", "recurrent_init": "orthogonal"}])
def test_orthogonal_recurrent_has_unit_singular_values(arch: str, spec: dict[str, Any]) -> None:
    # tanh's gain (5/3) on an orthogonal weight_hh would make every singular value 5/3: exploding state.
    model = _spec_model(arch=arch, d_model=16, hidden=32, **spec)
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[arch]
    for layer in model.layers:
        for block in layer.rnn.weight_hh_l0.detach().chunk(gates, 0):
            assert torch.allclose(torch.linalg.svdvals(block), torch.ones(32), atol=1e-5)


def test_orthogonal_init_gain_scales_recurrent_singular_values() -> None:
    model = _spec_model(arch="gru", d_model=16, hidden=32, init="orthogonal", init_gain=0.5)
    for block in model.layers[0].rnn.weight_hh_l0.detach().chunk(3, 0):
        assert torch.allclose(torch.linalg.svdvals(block), torch.full((32,), 0.5), atol=1e-5)
