"""What a spec will cost, without building it: parameters, memory, tokens, FLOPs, wall time.

Standard library only, so the API (which never imports torch) can answer a dry run with it, as it
parses specs with worker/engine/config.py. The parameter count is exact: it follows the modules of
worker/engine/models one by one (tests/engine/test_estimate.py compares it with torch's count for
many specs of every architecture). Memory and FLOPs are estimates whose formulas are in
docs/contracts.md ("Dry run").
"""

from __future__ import annotations

from typing import Any

GATES = {"rnn": 1, "gru": 3, "lstm": 4}
FP32_BYTES = 4
# Optimizer state tensors kept per parameter (each the parameter's size, fp32).
ADAM_STATES = 2  # exp_avg, exp_avg_sq (Adam and AdamW)
# byte tokenizer ids; a char tokenizer has one id per distinct corpus character plus one unknown
BYTE_VOCAB = 256
# Elements per hidden unit and token a recurrent layer saves for backward (measured on torch's CPU
# kernels: rnn pre-activation and output; gru and lstm every gate's input, output and state).
RECURRENT_SAVED = {"rnn": 2, "gru": 8, "lstm": 17}


def _norm(kind: str, width: int) -> int:
    """Parameters of make_norm(kind, width): LayerNorm and BatchNorm weight + bias, RMSNorm weight only.
    (BatchNorm's running mean and variance are buffers, not parameters.)"""
    return {"none": 0, "rmsnorm": width}.get(kind, 2 * width)


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _mlp_params(m: dict[str, Any], vocab: int) -> int:
    d, h, n = m["d_model"], m["hidden"], m["n_layers"]
    total = (vocab + 1) * d  # one extra row: the padding token before the sequence start
    widths = [m["context"] * d] + [h] * n
    for n_in, n_out in zip(widths[:-1], widths[1:], strict=True):
        total += _linear(n_in, n_out) + _norm(m["norm"], n_out)
        if m["residual"] and n_in != n_out:
            total += n_in * n_out  # bias-free skip projection
    # a tied head reads the embedding's first `vocab` rows and has no bias
    return total + (0 if m["tie_embeddings"] else _linear(h, vocab))


def _recurrent_params(m: dict[str, Any], vocab: int) -> int:
    d, h, n, g = m["d_model"], m["hidden"], m["n_layers"], GATES[m["arch"]]
    pre = m["norm_position"] == "pre"
    total = vocab * d
    for n_in in [d] + [h] * (n - 1):
        total += g * (n_in * h + h * h + 2 * h)  # weight_ih, weight_hh, bias_ih, bias_hh
        total += _norm(m["norm"], n_in if pre else h)
        if m["residual"] and n_in != h:
            total += n_in * h
    if pre:
        total += _norm(m["norm"], h)  # norm_f before the head
    return total + (0 if m["tie_embeddings"] else _linear(h, vocab))


def _transformer_params(m: dict[str, Any], vocab: int, seq_len: int) -> int:
    d, h, n = m["d_model"], m["hidden"], m["n_layers"]
    head_dim = d // m["n_heads"]
    qk = 2 * _norm("rmsnorm" if m["norm"] == "rmsnorm" else "layernorm", head_dim) if m["qk_norm"] else 0
    block = 2 * _norm(m["norm"], d) + _linear(d, 3 * d) + qk + _linear(d, d) + _linear(d, h) + _linear(h, d)
    norm_f = _norm(m["norm"], d) if m["norm_position"] == "pre" else 0
    head = 0 if m["tie_embeddings"] else d * vocab  # the head has no bias
    return vocab * d + seq_len * d + n * block + norm_f + head


def count_params(model: dict[str, Any], vocab: int, seq_len: int) -> int:
    """Exact trainable parameter count of build_model for a parsed (resolved) model section."""
    arch = model["arch"]
    if arch == "mlp":
        return _mlp_params(model, vocab)
    if arch == "transformer":
        return _transformer_params(model, vocab, seq_len)
    if arch in GATES:
        return _recurrent_params(model, vocab)
    raise ValueError(f"unknown model.arch {arch!r}")


def matmul_params(model: dict[str, Any], vocab: int, seq_len: int) -> int:
    """Weights each token multiplies through once per forward pass (the FLOP-counting N).

    Transformers: every parameter (the 6 N D rule of Kaplan et al. 2020, embeddings included).
    mlp and recurrent: the weight matrices only (input projection, every layer's matrices, skip
    projections and the head, tied or not); embedding lookups, biases and norms cost no matmul.
    A recurrent layer's weight_ih and weight_hh are both applied at every time step."""
    m, arch = model, model["arch"]
    if arch == "transformer":
        return count_params(model, vocab, seq_len)
    d, h, n = m["d_model"], m["hidden"], m["n_layers"]
    head = h * vocab
    if arch == "mlp":
        widths = [m["context"] * d] + [h] * n
        pairs = list(zip(widths[:-1], widths[1:], strict=True))
        skips = sum(a * b for a, b in pairs if m["residual"] and a != b)
        return sum(a * b for a, b in pairs) + skips + head
    g = GATES[arch]
    ins = [d] + [h] * (n - 1)
    skips = sum(a * h for a in ins if m["residual"] and a != h)
    return sum(g * (a * h + h * h) for a in ins) + skips + head


def optimizer_states(training: dict[str, Any]) -> int:
    """fp32 state tensors per parameter: Adam/AdamW 2 (first and second moments), SGD with momentum 1
    (the momentum buffer), plain SGD 0."""
    if training["optimizer"] in ("adam", "adamw"):
        return ADAM_STATES
    return 1 if training["momentum"] else 0


def activation_elements_per_token(model: dict[str, Any], vocab: int, seq_len: int) -> int:
    """Tensors autograd keeps for the backward pass, in elements per token of one micro-batch.

    Counted from the forward of worker/engine/models (each saved input or output once) and checked
    against the tensors autograd really saves (tests/engine/test_estimate.py):
    transformer per block: 2 norm inputs (2d), qkv (3d), attention output (d), the attention
    probabilities of the unfused (CPU math) kernel (n_heads * seq_len), out-projection input (d),
    FFN input (d), FFN pre- and post-activation (2 hidden), plus the embedding sum (d);
    mlp: the window input (context * d) and per block the linear output and activation output
    (2 hidden) plus the norm output (hidden) with a norm;
    recurrent per layer: its input plus RECURRENT_SAVED[arch] * hidden (the gate pre-activations,
    gate outputs and states torch's cell-by-cell kernel keeps per time step; cuDNN keeps less),
    plus the norm input with a norm. Every arch adds the logits and their gradient in fp32
    (2 vocab, the loss is taken in fp32: activation_bytes). Dropout masks (1 byte each) are left out."""
    m, arch = model, model["arch"]
    d, h, n = m["d_model"], m["hidden"], m["n_layers"]
    with_norm = m["norm"] != "none"
    if arch == "transformer":
        per_block = 2 * d + 3 * d + d + m["n_heads"] * seq_len + d + d + 2 * h
        return d + n * per_block
    if arch == "mlp":
        return m["context"] * d + n * (2 + with_norm) * h
    ins = [d] + [h] * (n - 1)
    return sum(a + RECURRENT_SAVED[arch] * h + (a if with_norm else 0) for a in ins)


def activation_bytes(spec: dict[str, Any], vocab: int) -> int:
    """Peak saved activations of one micro-batch (batch_size sequences of seq_len tokens).

    Under bf16/fp16 autocast the matmul outputs are half precision (2 bytes), else 4; the logits and
    their gradient are fp32 either way."""
    t = spec["training"]
    tokens = t["batch_size"] * t["seq_len"]
    half = spec["stabilization"]["precision"] in ("bf16", "fp16")
    body = activation_elements_per_token(spec["model"], vocab, t["seq_len"]) * (2 if half else FP32_BYTES)
    logits = 2 * vocab * FP32_BYTES
    return tokens * (body + logits)


def training_tokens(training: dict[str, Any]) -> int:
    """Tokens the run trains on: max_steps optimizer steps of batch_size * grad_accum_steps sequences."""
    return training["max_steps"] * training["batch_size"] * training["grad_accum_steps"] * training["seq_len"]


def eval_tokens(training: dict[str, Any]) -> int:
    """Tokens evaluated: eval_batches batches every eval_every steps and after the last step."""
    evals = training["max_steps"] // training["eval_every"]
    if training["max_steps"] % training["eval_every"]:
        evals += 1
    return evals * training["eval_batches"] * training["batch_size"] * training["seq_len"]


def vocab_for(tokenizer: dict[str, Any], text_chars: int | None = None) -> tuple[int, bool]:
    """(vocab size, exact?): byte 256; char the corpus' distinct characters + 1 (exact when given);
    bpe the configured vocab_size, an upper bound (a small corpus may stop merging earlier)."""
    kind = tokenizer.get("kind", "byte")
    if kind == "char":
        return ((text_chars + 1, True) if text_chars is not None else (BYTE_VOCAB, False))
    if kind == "bpe":
        return int(tokenizer["vocab_size"]), False
    return BYTE_VOCAB, True


def estimate(spec: dict[str, Any], vocab: int) -> dict[str, Any]:
    """The dry run's figures for a parsed spec dict (spec_to_dict(parse_spec(...))) at `vocab`."""
    model, training = spec["model"], spec["training"]
    seq_len = training["seq_len"]
    params = count_params(model, vocab, seq_len)
    states = optimizer_states(training)
    memory = {
        "params_bytes": params * FP32_BYTES,
        "grads_bytes": params * FP32_BYTES,
        "optimizer_bytes": states * params * FP32_BYTES,
        "activations_bytes": activation_bytes(spec, vocab),
        "optimizer_states_per_param": states,
    }
    memory["total_bytes"] = sum(v for k, v in memory.items() if k.endswith("_bytes"))
    n_flop = matmul_params(model, vocab, seq_len)
    tokens = training_tokens(training)
    evaluated = eval_tokens(training)
    # forward 2 N per token, backward twice that; evaluation is forward only
    train_flops = 6 * n_flop * tokens
    eval_flops = 2 * n_flop * evaluated
    return {
        "params": params,
        "flop_params": n_flop,
        "memory": memory,
        "tokens": tokens,
        "tokens_per_step": training["batch_size"] * training["grad_accum_steps"] * seq_len,
        "eval_tokens": evaluated,
        "flops": train_flops + eval_flops,
        "train_flops": train_flops,
        "eval_flops": eval_flops,
    }


def wall_seconds(flops: int, flops_per_s: float) -> float:
    """Seconds at a device's measured training throughput."""
    return flops / flops_per_s
