"""Export speed: Hugging Face archive and weights-only file of a ~10M-parameter transformer, on CPU.

Baseline in the same run: `torch.save` of the same checkpoint dict (what every checkpoint costs).
Rounds alternate between the three so machine noise hits all alike; medians are reported.
Prints seconds per operation and, last, `export_s: X` = the median Hugging Face archive export
(read checkpoint, map, safetensors, tokenizer, tar.gz) of the 10M model (target < 5 on CPU).

    python bench/export_speed.py [--rounds 5] [--tokenizer byte|bpe]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stabletrain_export.hf import write_hf_archive  # noqa: E402
from stabletrain_export.weights import write_weights  # noqa: E402
from worker.engine.checkpoint import save_checkpoint  # noqa: E402
from worker.engine.config import TokenizerConfig, parse_spec, spec_to_dict  # noqa: E402
from worker.engine.models import build_model  # noqa: E402
from worker.engine.tokenizers import ByteTokenizer, build_tokenizer  # noqa: E402

SPEC = {"model": {"arch": "transformer", "n_layers": 6, "d_model": 384, "n_heads": 6, "activation": "gelu",
                  "norm": "layernorm"}, "training": {"seq_len": 256}}
CORPUS = Path(__file__).resolve().parents[1] / "tests" / "data" / "corpus.txt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    args = parser.parse_args()
    raw = {**SPEC, "tokenizer": {"kind": args.tokenizer, "vocab_size": 2048}}
    spec = parse_spec(raw)
    tokenizer = (ByteTokenizer() if args.tokenizer == "byte"
                 else build_tokenizer(TokenizerConfig("bpe", 2048), CORPUS.read_text(encoding="utf-8")))
    model = build_model(spec.model, tokenizer.vocab_size, spec.training.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    state = {"spec": spec_to_dict(spec), "tokenizer": tokenizer.state_dict(), "model": model.state_dict(),
             "optimizer": torch.optim.AdamW(model.parameters()).state_dict(), "step": 1}
    times: dict[str, list[float]] = {"torch.save (baseline)": [], "hf archive": [], "weights only": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        save_checkpoint(tmp / "c.pt", state)
        for r in range(args.rounds):
            t0 = time.perf_counter()
            torch.save(state, io.BytesIO())
            t1 = time.perf_counter()
            write_hf_archive(tmp / "c.pt", tmp / f"hf{r}.tar.gz")
            t2 = time.perf_counter()
            write_weights(tmp / "c.pt", tmp / f"w{r}.safetensors")
            t3 = time.perf_counter()
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[key].append(dt)
        archive_mb = (tmp / "hf0.tar.gz").stat().st_size / 1e6
    print(f"model: {n_params / 1e6:.1f}M parameters, tokenizer {args.tokenizer} ({tokenizer.vocab_size} ids), "
          f"archive {archive_mb:.1f} MB, torch threads {torch.get_num_threads()}")
    for key, values in times.items():
        print(f"{key:>22}: {statistics.median(values):.3f} s (median of {len(values)})")
    base = statistics.median(times["torch.save (baseline)"])
    print(f"ratio hf/torch.save: {statistics.median(times['hf archive']) / base:.1f}")
    print(f"export_s: {statistics.median(times['hf archive']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
