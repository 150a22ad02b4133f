"""Model exports (Hugging Face GPT-2 layout, weights-only safetensors).

Neutral between the API and the worker: `blocker` is pure standard library (the API imports it to
answer 409 without torch); `hf` and `weights` need torch, safetensors and tokenizers (worker side).
"""

from __future__ import annotations

from pathlib import Path


def export_file(src: Path, fmt: str, out: Path) -> Path:
    """Export `src` (checkpoint or weights file) as `fmt`: "hf" (a folder) or "safetensors" (a file)."""
    if fmt == "hf":
        from stabletrain_export.hf import write_hf_dir

        return write_hf_dir(src, out)
    if fmt == "safetensors":
        from stabletrain_export.weights import write_weights

        return write_weights(src, out)
    raise ValueError(f"unknown export format {fmt!r}")
