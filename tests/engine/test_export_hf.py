"""Hugging Face export: transformers loads it and computes what the engine computes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stabletrain_export.hf import HF_FILES, byte_tokenizer_json, write_hf_dir
from stabletrain_export.rules import hf_export_blocker
from stabletrain_export.weights import ExportError
from tests.engine.spec_helpers import merge
from tests.export_helpers import GPT2_SPEC, assert_hf_matches, write_checkpoint
from worker.engine.config import parse_spec, spec_to_dict
from worker.engine.tokenizers import ByteTokenizer, CharTokenizer

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Hello, 你好 — ok"

MAPPABLE = {
    "untied-gelu": {},
    "tied-gelu": {"model": {"tie_embeddings": True}},
    "relu": {"model": {"activation": "relu"}},
    "leaky_relu": {"model": {"activation": "leaky_relu"}},
    "silu": {"model": {"activation": "silu", "tie_embeddings": True}},
    "tanh": {"model": {"activation": "tanh"}},
    "sigmoid": {"model": {"activation": "sigmoid"}},
    "dropout-3-layers-8-heads": {"model": {"dropout": 0.2, "n_layers": 3, "n_heads": 8}},
}

UNMAPPABLE = {
    **{arch: ({"model": {"arch": arch}}, "model.arch") for arch in ("mlp", "rnn", "gru", "lstm")},
    "rmsnorm": ({"model": {"norm": "rmsnorm"}}, "model.norm"),
    "no-norm": ({"model": {"norm": "none"}}, "model.norm"),
    "post-norm": ({"model": {"norm_position": "post"}}, "model.norm_position"),
    "no-residual": ({"model": {"residual": False}}, "model.residual"),
    "qk-norm": ({"model": {"qk_norm": True}}, "model.qk_norm"),
    "elu": ({"model": {"activation": "elu"}}, "model.activation"),
}


@pytest.mark.parametrize("over", MAPPABLE.values(), ids=list(MAPPABLE))
def test_round_trip_through_transformers(tmp_path: Path, over: dict[str, Any]) -> None:
    model, tokenizer = write_checkpoint(tmp_path / "c.pt", merge(GPT2_SPEC, over))
    folder = write_hf_dir(tmp_path / "c.pt", tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == sorted(HF_FILES)
    config = json.loads((folder / "config.json").read_text())
    spec = parse_spec(merge(GPT2_SPEC, over))
    assert config["tie_word_embeddings"] is spec.model.tie_embeddings
    assert config["activation_function"] == spec.model.activation and config["n_positions"] == 48
    assert_hf_matches(folder, model, tokenizer, PROMPT)


def _with(over: dict[str, Any]) -> dict[str, Any]:
    """GPT2_SPEC with `over`; another arch keeps only the fields every arch reads (n_heads is the
    transformer's, gelu is not a recurrent cell's activation)."""
    arch = over["model"].get("arch", "transformer")
    if arch == "transformer":
        return merge(GPT2_SPEC, over)
    model = {k: v for k, v in GPT2_SPEC["model"].items() if k in ("n_layers", "d_model", "norm")}
    return {**GPT2_SPEC, "model": {**model, "arch": arch, "activation": "tanh"}}


@pytest.mark.parametrize("over,field", UNMAPPABLE.values(), ids=list(UNMAPPABLE))
def test_unmappable_specs_name_their_field(tmp_path: Path, over: dict[str, Any], field: str) -> None:
    raw = _with(over)
    blocker = hf_export_blocker(spec_to_dict(parse_spec(raw)))
    assert blocker is not None and blocker[0] == field
    write_checkpoint(tmp_path / "c.pt", raw)
    with pytest.raises(ExportError, match=field.replace(".", r"\.")):
        write_hf_dir(tmp_path / "c.pt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_the_default_transformer_maps_and_the_other_archs_keep_their_defaults() -> None:
    transformer = parse_spec({"model": {"arch": "transformer"}}).model
    assert (transformer.activation, transformer.norm) == ("gelu", "layernorm")
    assert hf_export_blocker(spec_to_dict(parse_spec({"model": {"arch": "transformer"}}))) is None
    for arch in ("mlp", "rnn", "gru", "lstm"):
        model = parse_spec({"model": {"arch": arch}}).model
        assert (model.activation, model.norm) == ("tanh", "none"), arch
    # the options that read the norm are judged by the resolved one
    assert parse_spec({"model": {"arch": "transformer", "norm_position": "post"}}).model.norm_position == "post"


def test_an_unknown_tokenizer_kind_blocks() -> None:
    raw = spec_to_dict(parse_spec(GPT2_SPEC))
    raw["tokenizer"]["kind"] = "sentencepiece"
    assert hf_export_blocker(raw)[0] == "tokenizer.kind"


def test_an_unknown_model_option_blocks_until_judged() -> None:
    raw = spec_to_dict(parse_spec(GPT2_SPEC))
    assert hf_export_blocker(raw) is None
    raw["model"]["parallel_blocks"] = True
    assert hf_export_blocker(raw) == ("model.parallel_blocks", "not known to the GPT-2 export")


@pytest.mark.parametrize("corpus_text", ["hello world\n中文 ok\r\n\t", "has \ufffd in it"], ids=["plain", "fffd"])
def test_char_tokenizer_round_trip(tmp_path: Path, corpus_text: str) -> None:
    tokenizer = CharTokenizer.from_text(corpus_text)
    raw = merge(GPT2_SPEC, {"tokenizer": {"kind": "char"}})
    model, _ = write_checkpoint(tmp_path / "c.pt", raw, tokenizer=tokenizer)
    folder = write_hf_dir(tmp_path / "c.pt", tmp_path / "hf")
    assert_hf_matches(folder, model, tokenizer, "hello 中 wxrld\n🙂", new_tokens=12)  # x and 🙂: unknown


def test_byte_tokenizer_is_byte_exact_in_transformers(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    (tmp_path / "tokenizer.json").write_text(byte_tokenizer_json())
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    engine = ByteTokenizer()
    for text in ("plain ascii", "中文文本，还有标点。", "emoji 🙂 and\ttabs\r\n", "\x00\x7f\u00ff"):
        assert tok(text)["input_ids"] == engine.encode(text)
        assert tok.decode(engine.encode(text)) == text
    broken = [0xE4, 0xBD, 0x41, 0xFF, 0xF0, 0x9F, 0x99]  # cut and invalid sequences, as a sampler may emit
    assert tok.decode(broken) == engine.decode(broken)
    assert tok.vocab_size == 256


def test_cli_exports_a_trained_checkpoint(tmp_path: Path) -> None:
    from tests.engine.spec_helpers import corpus

    spec = merge(GPT2_SPEC, {"training": {"max_steps": 15, "batch_size": 4, "seq_len": 32, "lr": 3e-3,
                                          "eval_every": 1000},
                             "checkpointing": {"every_steps": 1000}, "monitoring": {"layer_stats_every": 50}})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "data.txt").write_text(corpus(6000))
    run = [sys.executable, "-m", "worker.engine"]
    train = subprocess.run([*run, "train", "spec.json", "--data", "data.txt", "--out", "run"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env=_env())
    assert train.returncode == 0, train.stderr
    ckpt = tmp_path / "run" / "checkpoints" / "step_15.pt"
    export = subprocess.run([*run, "export", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")],
                            capture_output=True, text=True, timeout=300, env=_env())
    assert export.returncode == 0, export.stderr
    from worker.engine.sampling import load_model_file

    model, tokenizer = load_model_file(ckpt)[1:]
    assert_hf_matches(tmp_path / "hf", model, tokenizer, "The ", new_tokens=20)


def test_cli_refuses_an_unmappable_checkpoint_with_exit_2(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "c.pt", _with({"model": {"arch": "gru"}}))
    proc = subprocess.run([sys.executable, "-m", "worker.engine", "export", str(tmp_path / "c.pt"),
                           "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 2 and "model.arch" in proc.stderr
    assert not (tmp_path / "hf").exists()


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}
