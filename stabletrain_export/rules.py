"""Export rules shared by the API and the worker (pure standard library: the API imports this).

Which specs map onto Hugging Face's GPT-2, and where an export of a checkpoint is stored.
"""

from __future__ import annotations

from typing import Any

FORMATS = ("hf", "safetensors")
# What each format's stored file ends with, and its media type when served.
SUFFIXES = {"hf": ".hf.tar.gz", "safetensors": ".safetensors"}
MEDIA_TYPES = {"hf": "application/gzip", "safetensors": "application/octet-stream"}
# Beside an export's name: the API sent a request (PENDING) / the worker's failure message (ERROR).
PENDING_SUFFIX, ERROR_SUFFIX = ".pending", ".error"

# The engine's activation modules with the same function under the same name in transformers'
# ACT2FN ("gelu" there is the exact erf form, like torch.nn.GELU(); ACT2FN has no "elu").
HF_ACTIVATIONS = ("gelu", "relu", "leaky_relu", "sigmoid", "silu", "tanh")
HF_TOKENIZERS = ("byte", "char", "bpe")

# Model fields that change training (initialisation, regularisation) or are read from the
# weights (widths, depth, tying), never the function GPT-2 computes.
_FREE_MODEL_FIELDS = frozenset({
    "n_layers", "d_model", "hidden", "context", "n_heads", "init", "init_std", "init_gain",
    "recurrent_init", "forget_bias", "dropout", "tie_embeddings", "depth_scaled_init",
})


def hf_export_blocker(spec: dict[str, Any]) -> tuple[str, str] | None:
    """(field path, reason) of the first spec setting GPT-2 cannot express, or None when it maps.

    `spec` is a stored (parsed) spec dict. A model field this function does not know blocks the
    export: a new option must be judged here before exports of it are trusted.
    """
    model = spec.get("model") or {}
    if model.get("arch") != "transformer":
        return "model.arch", f"{model.get('arch')!r} has no GPT-2 equivalent; only transformer exports"
    checks = (
        ("norm", model.get("norm") == "layernorm", "GPT-2 uses layernorm"),
        ("norm_position", model.get("norm_position") == "pre", "GPT-2 blocks are pre-norm"),
        ("residual", model.get("residual") is not False, "GPT-2 blocks have residual connections"),
        ("qk_norm", not model.get("qk_norm"), "GPT-2 attention has no norm on queries and keys"),
        ("activation", model.get("activation") in HF_ACTIVATIONS,
         f"GPT-2 in transformers supports {', '.join(HF_ACTIVATIONS)}"),
    )
    for name, ok, reason in checks:
        if not ok:
            return f"model.{name}", f"{model.get(name)!r} does not map: {reason}"
    unknown = sorted(set(model) - _FREE_MODEL_FIELDS - {name for name, _, _ in checks} - {"arch"})
    if unknown:
        return f"model.{unknown[0]}", "not known to the GPT-2 export"
    kind = (spec.get("tokenizer") or {}).get("kind", "byte")
    if kind not in HF_TOKENIZERS:
        return "tokenizer.kind", (f"{kind!r} has no Hugging Face tokenizer export; "
                                  f"use {' or '.join(HF_TOKENIZERS)}")
    return None


def export_relpath(job_id: str, step: int, sha256: str, fmt: str) -> str:
    """Stored export of one checkpoint, relative to the storage folder.

    The checkpoint's sha256 is part of the name: a checkpoint rewritten at the same step (a resumed
    run) never serves the export of the file it replaced.
    """
    return f"exports/{job_id}/step_{int(step)}-{sha256[:16]}{SUFFIXES[fmt]}"


def export_blocker(spec: dict[str, Any], fmt: str) -> tuple[str, str] | None:
    """What prevents exporting a job of `spec` as `fmt` (weights-only files take any model)."""
    return hf_export_blocker(spec) if fmt == "hf" else None
