"""The dry run's analytic figures (worker/engine/estimate.py) against the engine's real models."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from worker.engine import estimate
from worker.engine.config import SpecError, parse_spec, spec_to_dict
from worker.engine.models import build_model
from worker.engine.trainer import build_optimizer

NORMS = {"mlp": ["none", "batchnorm", "layernorm", "rmsnorm"]}
OTHER_NORMS = ["none", "layernorm", "rmsnorm"]


def _model_specs() -> list[dict]:
    """Every arch x norm x norm position x residual x tie, with varied widths (invalid combos dropped)."""
    rng = random.Random(7)
    specs = []
    for arch in ("mlp", "rnn", "gru", "lstm", "transformer"):
        for norm, position, residual, tie in itertools.product(
                NORMS.get(arch, OTHER_NORMS), ["pre", "post"], [False, True], [False, True]):
            d = rng.choice([8, 12, 16, 24])
            model = {"arch": arch, "norm": norm, "residual": residual, "tie_embeddings": tie,
                     "n_layers": rng.randint(1, 3), "d_model": d,
                     "hidden": d if tie and arch != "transformer" else rng.choice([d, 20, 32])}
            if norm != "none":
                model["norm_position"] = position
            elif position == "post":
                continue
            if arch == "mlp":
                model["context"] = rng.randint(1, 4)
            if arch == "transformer":
                model["n_heads"] = rng.choice([1, 2, 4])
                model["qk_norm"] = rng.random() < 0.5
            if arch == "gru" or arch == "lstm":
                model["activation"] = "tanh"
            specs.append(model)
    return specs


def _parsed(model: dict, **training) -> dict:
    return spec_to_dict(parse_spec({"model": model, "training": {"seq_len": 16, **training}}))


@pytest.mark.parametrize("model", _model_specs(), ids=lambda m: "-".join(str(v) for v in m.values()))
def test_param_count_is_exact(model: dict) -> None:
    try:
        spec = _parsed(model)
    except SpecError as exc:  # e.g. depth/tie combinations the engine refuses
        pytest.skip(str(exc))
    vocab = 37
    built = build_model(parse_spec(spec).model, vocab, 16)
    assert estimate.count_params(spec["model"], vocab, 16) == sum(p.numel() for p in built.parameters())


def test_every_arch_is_covered() -> None:
    archs = {m["arch"] for m in _model_specs()}
    assert archs == {"mlp", "rnn", "gru", "lstm", "transformer"}
    assert len(_model_specs()) > 60


@pytest.mark.parametrize(("optimizer", "momentum", "states"),
                         [("adamw", None, 2), ("adam", None, 2), ("sgd", 0.9, 1), ("sgd", 0.0, 0)])
def test_optimizer_states_match_torch(optimizer: str, momentum: float | None, states: int) -> None:
    training = {"optimizer": optimizer, **({"momentum": momentum} if momentum is not None else {})}
    spec = _parsed({"arch": "mlp", "d_model": 8, "hidden": 16}, **training)
    model = build_model(parse_spec(spec).model, 40, 16)
    opt = build_optimizer(model, parse_spec(spec).training)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state_elements = sum(t.numel() for s in opt.state.values() for t in s.values()
                         if isinstance(t, torch.Tensor) and t.dim() > 0)
    n = sum(p.numel() for p in model.parameters())
    assert estimate.optimizer_states(spec["training"]) == states
    assert state_elements == states * n
    assert estimate.estimate(spec, 40)["memory"]["optimizer_bytes"] == 4 * states * n


def test_tokens_and_flops_formulas() -> None:
    spec = _parsed({"arch": "transformer", "n_layers": 2, "d_model": 16, "n_heads": 2},
                   max_steps=100, batch_size=8, grad_accum_steps=3, eval_every=30, eval_batches=2)
    out = estimate.estimate(spec, 256)
    assert out["tokens"] == 100 * 8 * 3 * 16
    assert out["tokens_per_step"] == 8 * 3 * 16
    # evaluations at steps 30, 60, 90 and after the last step (100)
    assert out["eval_tokens"] == 4 * 2 * 8 * 16
    assert out["train_flops"] == 6 * out["params"] * out["tokens"]
    assert out["flops"] == out["train_flops"] + 2 * out["params"] * out["eval_tokens"]


def test_recurrent_flops_count_both_matrices_per_step() -> None:
    spec = _parsed({"arch": "lstm", "n_layers": 2, "d_model": 10, "hidden": 20}, max_steps=1,
                   batch_size=1, eval_every=1)
    # layer 0: 4 gates x (10x20 + 20x20); layer 1: 4 x (20x20 + 20x20); head 20 x 256
    n = 4 * (200 + 400) + 4 * (400 + 400) + 20 * 256
    assert estimate.matmul_params(spec["model"], 256, 16) == n
    assert estimate.estimate(spec, 256)["train_flops"] == 6 * n * 16


def test_mixed_precision_halves_the_body_activations_not_the_logits() -> None:
    base = {"model": {"arch": "transformer", "n_layers": 2, "d_model": 32, "n_heads": 2},
            "training": {"batch_size": 4, "seq_len": 16}}
    fp32 = spec_to_dict(parse_spec(base))
    bf16 = spec_to_dict(parse_spec({**base, "stabilization": {"precision": "bf16"}}))
    logits = 4 * 16 * 2 * 256 * 4
    a32, a16 = (estimate.activation_bytes(s, 256) for s in (fp32, bf16))
    assert a32 - logits == 2 * (a16 - logits)


def test_vocab_rules() -> None:
    assert estimate.vocab_for({"kind": "byte"}) == (256, True)
    assert estimate.vocab_for({"kind": "char"}, text_chars=60) == (61, True)
    assert estimate.vocab_for({"kind": "bpe", "vocab_size": 2000}) == (2000, False)


def test_activation_estimate_is_within_a_factor_of_the_saved_tensors() -> None:
    """The estimate against what autograd really keeps: the bytes of every tensor saved for backward
    (saved_tensors_hooks, distinct storages) plus the logits' gradient, for one small config per arch."""
    for model in ({"arch": "transformer", "n_layers": 2, "d_model": 32, "n_heads": 2},
                  {"arch": "mlp", "n_layers": 2, "d_model": 16, "hidden": 64, "context": 4},
                  {"arch": "mlp", "n_layers": 3, "d_model": 16, "hidden": 32, "norm": "layernorm"},
                  {"arch": "rnn", "n_layers": 2, "d_model": 32, "hidden": 64},
                  {"arch": "gru", "n_layers": 1, "d_model": 16, "hidden": 128, "norm": "rmsnorm"},
                  {"arch": "lstm", "n_layers": 2, "d_model": 32, "hidden": 64}):
        spec = _parsed(model, batch_size=8)
        net = build_model(parse_spec(spec).model, 256, 16)
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, seen: dict[int, int] = seen) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        idx = torch.randint(0, 256, (8, 16))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = net(idx)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx.flatten())
        params = {p.untyped_storage().data_ptr() for p in net.parameters()}
        saved = sum(b for ptr, b in seen.items() if ptr not in params) + logits.numel() * 4
        estimated = estimate.activation_bytes(spec, 256)
        assert saved / 2 <= estimated <= saved * 2, (model["arch"], estimated, saved)
        loss.backward()
