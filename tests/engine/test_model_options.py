"""Every model option changes the model's outputs where it applies, and is refused where it cannot."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.engine.refused_specs import NON_JSON_CASES, case_id, refused_cases
from worker.engine.config import SpecError, parse_spec
from worker.engine.models import build_model

VOCAB, SEQ = 31, 10
SMALL = {"n_layers": 2, "d_model": 16, "hidden": 24}


def _outputs(model_cfg: dict[str, Any], train: bool = False) -> torch.Tensor:
    """Logits of a freshly built model (seed 0) on a fixed batch; dropout active when train."""
    cfg = parse_spec({"model": model_cfg, "training": {"seq_len": SEQ}}).model
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, SEQ)
    model.train(train)
    idx = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same dropout masks for both models
    with torch.no_grad():
        return model(idx)


# (base model spec, option, the other value): the option applies to the base.
APPLIES: list[tuple[dict[str, Any], str, Any]] = []
for arch in ("mlp", "rnn", "gru", "lstm", "transformer"):
    base = {"arch": arch, **SMALL, **({"context": 3} if arch == "mlp" else {})}
    normed = {**base, "norm": "layernorm"}
    APPLIES += [
        (base, "n_layers", 3),
        (base, "d_model", 8),
        (base, "hidden", 12),
        (base, "norm", "rmsnorm"),
        (normed, "norm_position", "post"),
        ({**normed, "residual": True}, "norm_position", "post"),
        (base, "residual", arch != "transformer"),
        (base, "init", "xavier_uniform"),
        ({**base, "init": "normal"}, "init_std", 0.1),
        ({**base, "init": "kaiming_normal"}, "init_gain", 2.0),
        ({**base, "init": "orthogonal"}, "init_gain", 0.5),
        ({**base, "hidden": 16}, "tie_embeddings", True),
    ]
    if arch in ("mlp", "transformer"):
        APPLIES += [
            (base, "activation", "relu"),
            ({**base, "residual": True}, "depth_scaled_init", True),
        ]
    if arch in ("rnn", "gru", "lstm"):
        APPLIES.append((base, "recurrent_init", "orthogonal"))
APPLIES += [
    ({"arch": "rnn", **SMALL}, "activation", "relu"),
    ({"arch": "mlp", **SMALL}, "norm", "batchnorm"),
    ({"arch": "mlp", **SMALL}, "context", 2),
    ({"arch": "mlp", **SMALL, "norm": "batchnorm"}, "norm_position", "post"),
    ({"arch": "lstm", **SMALL}, "forget_bias", 1.0),
    ({"arch": "transformer", **SMALL}, "n_heads", 2),
    ({"arch": "transformer", **SMALL}, "qk_norm", True),
    ({"arch": "transformer", **SMALL, "norm": "rmsnorm"}, "qk_norm", True),
    ({"arch": "transformer", "d_model": 16}, "hidden", 16),  # the FFN width, 64 when unset
]


@pytest.mark.parametrize(("base", "option", "value"), APPLIES,
                         ids=[f"{b['arch']}-{o}={v}-{i}" for i, (b, o, v) in enumerate(APPLIES)])
def test_option_changes_outputs(base: dict[str, Any], option: str, value: Any) -> None:
    assert base.get(option) != value
    # An untrained batchnorm is the identity at evaluation (running stats 0 and 1): compare batch statistics.
    train = "batchnorm" in (base.get("norm"), value)
    off = _outputs(base, train)
    on = _outputs({**base, option: value}, train)
    assert on.shape == off.shape
    assert not torch.allclose(on, off, atol=1e-6), f"model.{option}={value!r} did not change the outputs"


@pytest.mark.parametrize("arch", ["mlp", "rnn", "gru", "lstm", "transformer"])
def test_dropout_changes_training_outputs(arch: str) -> None:
    base = {"arch": arch, **SMALL}
    assert not torch.allclose(_outputs(base, train=True), _outputs({**base, "dropout": 0.3}, train=True))
    # and is off at evaluation
    assert torch.allclose(_outputs(base), _outputs({**base, "dropout": 0.3}))


@pytest.mark.parametrize("case", refused_cases() + NON_JSON_CASES, ids=case_id)
def test_engine_refuses_with_field_path(case: tuple[dict[str, Any], str]) -> None:
    raw, path = case
    with pytest.raises(SpecError) as error:
        parse_spec(raw)
    assert error.value.path == path, str(error.value)


def test_arch_specific_options_at_their_default_are_accepted() -> None:
    # A stored spec carries every default: re-parsing it must not trip the "does not apply" checks.
    spec = parse_spec({"model": {"arch": "gru", "context": 8, "n_heads": 4, "qk_norm": False, "forget_bias": 0.0,
                                 "init_std": 0.02, "init_gain": 1.0, "norm_position": "pre"}})
    assert spec.model.arch == "gru"


@pytest.mark.parametrize(("arch", "d_model", "hidden"), [("transformer", 48, 192), ("lstm", 48, 128), ("mlp", 48, 128)])
def test_hidden_defaults_per_arch(arch: str, d_model: int, hidden: int) -> None:
    assert parse_spec({"model": {"arch": arch, "d_model": d_model}}).model.hidden == hidden
    assert parse_spec({"model": {"arch": arch, "d_model": d_model, "hidden": None}}).model.hidden == hidden
    assert parse_spec({"model": {"arch": arch, "d_model": d_model, "hidden": 40}}).model.hidden == 40


def test_transformer_ffn_width_is_hidden() -> None:
    gpt = build_model(parse_spec({"model": {"arch": "transformer", "d_model": 16, "hidden": 40}}).model, VOCAB, SEQ)
    assert gpt.blocks[0].mlp.fc.weight.shape == (40, 16) and gpt.blocks[0].mlp.proj.weight.shape == (16, 40)
    default = build_model(parse_spec({"model": {"arch": "transformer", "d_model": 16}}).model, VOCAB, SEQ)
    assert default.blocks[0].mlp.fc.out_features == 64


def test_mlp_norm_positions() -> None:
    pre = build_model(parse_spec({"model": {"arch": "mlp", **SMALL, "context": 3, "norm": "layernorm"}}).model,
                      VOCAB, SEQ)
    assert pre.layers[0].norm.normalized_shape == (3 * 16,)  # normalizes the block input
    assert isinstance(pre.norm_f, torch.nn.LayerNorm)
    post = build_model(parse_spec({"model": {"arch": "mlp", **SMALL, "context": 3, "norm": "layernorm",
                                             "norm_position": "post"}}).model, VOCAB, SEQ)
    assert post.layers[0].norm.normalized_shape == (24,)
    assert isinstance(post.norm_f, torch.nn.Identity)
    # post-norm: every block's output has zero mean and unit variance per row
    x = torch.randn(5, 3 * 16)
    with torch.no_grad():
        out = post.layers[0](x)
    assert torch.allclose(out.mean(-1), torch.zeros(5), atol=1e-5)


def test_mlp_residual_projects_when_widths_differ() -> None:
    model = build_model(parse_spec({"model": {"arch": "mlp", **SMALL, "context": 3, "residual": True}}).model,
                        VOCAB, SEQ)
    assert model.layers[0].proj is not None and model.layers[1].proj is None
