"""Hugging Face export: a GPT-2 folder (config, safetensors weights, tokenizer) from an engine file.

The engine's pre-norm transformer is GPT-2 up to names: tok_emb/pos_emb are wte/wpe, each block's
norm1/attn.qkv/attn.proj/norm2/mlp.fc/mlp.proj are ln_1/attn.c_attn/attn.c_proj/ln_2/mlp.c_fc/
mlp.c_proj, norm_f is ln_f and head is lm_head. GPT-2 keeps its linear layers as Conv1D, whose
weight is the transpose of nn.Linear's. Nothing here imports transformers: the folder is plain files.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from stabletrain_export.rules import hf_export_blocker
from stabletrain_export.weights import ExportError, atomic_path, model_tensors, read_engine_state
from worker.engine.config import parse_spec

HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json")
# Engine key suffix -> GPT-2 key suffix inside block i; True: a Linear weight stored transposed.
_BLOCK_KEYS = {
    "norm1.weight": ("ln_1.weight", False), "norm1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True), "attn.proj.bias": ("attn.c_proj.bias", False),
    "norm2.weight": ("ln_2.weight", False), "norm2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True), "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True), "mlp.proj.bias": ("mlp.c_proj.bias", False),
}
_TOP_KEYS = {"tok_emb.weight": "transformer.wte.weight", "pos_emb.weight": "transformer.wpe.weight",
             "norm_f.weight": "transformer.ln_f.weight", "norm_f.bias": "transformer.ln_f.bias"}


def check_exportable(spec: dict[str, Any]) -> None:
    """ExportError naming the field when the spec does not map onto GPT-2."""
    blocker = hf_export_blocker(spec)
    if blocker:
        raise ExportError(f"{blocker[0]}: {blocker[1]}")


def gpt2_tensors(state: dict[str, torch.Tensor], n_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """The engine's transformer state under GPT2LMHeadModel's names (tied head: wte only)."""
    out = {hf: state[key] for key, hf in _TOP_KEYS.items()}
    for i in range(n_layers):
        for key, (hf, transpose) in _BLOCK_KEYS.items():
            t = state[f"blocks.{i}.{key}"]
            out[f"transformer.h.{i}.{hf}"] = t.t().contiguous() if transpose else t
    if not tied:
        out["lm_head.weight"] = state["head.weight"]
    return model_tensors(out)


def gpt2_config(spec: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """config.json for GPT2LMHeadModel; widths are read from the weights themselves."""
    m = spec["model"]
    vocab, d_model = state["tok_emb.weight"].shape
    dropout = float(m.get("dropout", 0.0))  # inert at inference; kept for fine-tuning
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": int(vocab), "n_positions": int(state["pos_emb.weight"].shape[0]),
        "n_embd": int(d_model), "n_layer": int(m["n_layers"]), "n_head": int(m["n_heads"]),
        "n_inner": int(state["blocks.0.mlp.fc.weight"].shape[0]),
        "activation_function": m["activation"], "layer_norm_epsilon": 1e-5,  # torch LayerNorm's eps
        "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout,
        "scale_attn_weights": True, "tie_word_embeddings": bool(m.get("tie_embeddings")),
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "use_cache": True, "dtype": "float32",
    }


def byte_tokenizer_json() -> str:
    """tokenizer.json equal to the engine's byte tokenizer: id b is byte b, no merges.

    A byte-level BPE with an empty merge list: ByteLevel maps each byte to one of 256 printable
    characters (GPT-2's table), and the vocabulary gives that character the byte's own value.
    """
    alphabet = _byte_level_alphabet()
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (the one tokenizers' ByteLevel uses).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes take the code points from
    256 upwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 256 + 256 - len(printable)))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def char_tokenizer_json(chars: list[str]) -> str:
    """tokenizer.json equal to the engine's char tokenizer: id i is chars[i], the next id is unknown.

    Every character is its own pre-token ("(?m)." in Oniguruma: any character, newlines included),
    looked up in a word-level vocabulary; the decoder joins them without separators. The unknown
    token is named "<unk>" (no single character can clash with it, U+FFFD included) and decodes
    to U+FFFD, as in the engine.
    """
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<unk>"] = len(chars)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("<unk>", "\ufffd"), decoders.Fuse()])
    return tok.to_str()


def tokenizer_json(state: dict[str, Any]) -> str:
    """tokenizer.json for an engine tokenizer state (byte, char, or bpe: its own saved JSON)."""
    if state.get("kind") == "byte":
        return byte_tokenizer_json()
    if state.get("kind") == "char":
        return char_tokenizer_json(list(state["chars"]))
    if state.get("kind") == "bpe":
        return state["json"]
    raise ExportError(f"tokenizer.kind: {state.get('kind')!r} has no Hugging Face tokenizer export")


def write_hf_dir(src: Path, out_dir: Path) -> Path:
    """Write the Hugging Face folder of a checkpoint or weights file; ExportError if it cannot map."""
    state = read_engine_state(src)
    spec = state["spec"]
    check_exportable(spec)
    seq_len = int(parse_spec(spec).training.seq_len)
    weights = state["model"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tied = bool(spec["model"].get("tie_embeddings"))
    save_file(gpt2_tensors(weights, int(spec["model"]["n_layers"]), tied), str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    _write_json(out_dir / "config.json", gpt2_config(spec, weights))
    # Greedy by default, like the engine's sampler at temperature 0.
    _write_json(out_dir / "generation_config.json", {
        "do_sample": False, "bos_token_id": None, "eos_token_id": None,
        "pad_token_id": None})
    (out_dir / "tokenizer.json").write_text(tokenizer_json(state["tokenizer"]), encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False, "add_prefix_space": False})
    return out_dir


def write_hf_archive(src: Path, archive: Path) -> Path:
    """The Hugging Face folder as a .tar.gz (files at the top level), written atomically."""
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hf-", dir=archive.parent) as tmp, atomic_path(archive) as part:
        folder = write_hf_dir(src, Path(tmp) / "model")
        # Stored, not deflated: float weights shrink by ~7% at level 1, which took 3.5 s of the
        # 3.6 s export of a 10M-parameter model (bench/export_speed.py); level 0 keeps the .tar.gz
        # format every tool opens at the cost of a copy.
        with tarfile.open(part, "w:gz", compresslevel=0) as tar:
            for name in HF_FILES:
                tar.add(folder / name, arcname=name)
    return archive


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
