"""Data path: memory-mapped token batches against today's in-memory int64 stream, and peak RSS by corpus size.

1. Speed. The same corpus (byte tokenizer) as an in-memory int64 tensor (`load_text_data`, the baseline)
   and as the cached uint16 token file (`CorpusFile`, memory-mapped). Blocks alternate between the two
   (ABBA) so machine noise hits both alike; medians are reported. Measured twice: batch drawing alone
   (`TokenData.batch`) and whole trainer steps of a small transformer (what a job sees).
2. Memory. Peak RSS of a fresh process that tokenizes a generated corpus into the token cache and trains
   30 steps from it, for a 1 MB and a large (default 200 MB) corpus in /tmp; each in its own subprocess,
   byte tokenizer. The figure is the child's VmHWM (`ru_maxrss` is printed beside it: Linux keeps it
   across exec, so a child of this large parent reports at least the parent's peak). `--baseline-rss`
   also measures the former path (text read whole, ids as a list and an int64 tensor) at 1 and 20 MB.

Prints the figures, then `rss_delta_mb: Y` = large-corpus peak RSS minus 1 MB-corpus peak RSS (target
<= 300), `batch_ratio: B` = token-file / in-memory tokens/s of drawing batches alone and, last,
`ratio: X` = the same for trainer steps; both ratios are medians of the per-round ratios (target >= 0.97).

    python bench/data_speed.py [--rounds 10] [--steps 10] [--batch-rounds 30] [--large-mb 200] [--baseline-rss]
                               [--parts speed,rss] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker.engine.config import TokenizerConfig, parse_spec  # noqa: E402
from worker.engine.corpus import CorpusFile, data_for, tokenizer_for  # noqa: E402
from worker.engine.data import load_text_data  # noqa: E402
from worker.engine.tokenizers import ByteTokenizer  # noqa: E402
from worker.engine.trainer import Trainer  # noqa: E402

CORPUS = REPO / "tests" / "data" / "corpus.txt"
BATCH, SEQ_LEN = 16, 128
SPEC = {
    "model": {"arch": "transformer", "n_layers": 2, "d_model": 64, "n_heads": 4, "norm": "layernorm"},
    "training": {"max_steps": 1_000_000, "batch_size": BATCH, "seq_len": SEQ_LEN, "lr": 1e-3, "eval_every": 1_000_000},
    "monitoring": {"layer_stats_every": 10},
    "checkpointing": {"every_steps": 1_000_000},
}
RSS_SPEC = {**SPEC, "training": {**SPEC["training"], "max_steps": 30, "eval_every": 10}}


def make_corpus(path: Path, n_bytes: int) -> Path:
    """A UTF-8 corpus of about n_bytes: the test corpus repeated, each copy numbered (so it is not periodic)."""
    base = CORPUS.read_text(encoding="utf-8")
    with open(path, "w", encoding="utf-8") as fh:
        written, i = 0, 0
        while written < n_bytes:
            piece = f"[{i}] " + base
            fh.write(piece)
            written += len(piece.encode("utf-8"))
            i += 1
    return path


def alternate(runs: list, rounds: int, work: int) -> tuple[float, float, float]:
    """Median tokens/s of the two runs and the median of their per-round ratio (second / first).

    Blocks alternate ABBA so neither always goes first; a round's ratio pairs two adjacent blocks, so a
    change in the machine's load between rounds cancels out.
    """
    rates: list[list[float]] = [[], []]
    for r in range(rounds):
        for k in (0, 1) if r % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            runs[k]()
            rates[k].append(work / (time.perf_counter() - t0))
    ratios = [b / a for a, b in zip(rates[0], rates[1], strict=True)]
    return statistics.median(rates[0]), statistics.median(rates[1]), statistics.median(ratios)


def bench_batches(data_a, data_b, rounds: int, n: int) -> tuple[float, float, float]:
    """`alternate` over blocks of n `batch("train")` calls of two TokenData."""
    def block(data):
        def run() -> None:
            gen = torch.Generator().manual_seed(0)
            for _ in range(n):
                data.batch("train", BATCH, gen)
        return run

    return alternate([block(data_a), block(data_b)], rounds, n * BATCH * SEQ_LEN)


def bench_trainers(text: str, corpus: CorpusFile, rounds: int, steps: int, tmp: Path) -> tuple[float, float, float]:
    """Tokens/s of trainer steps from the in-memory text and from the token file, and their ratio.

    The two trainers take turns step by step (ABBA within a round), since a step is long enough to time
    alone and load changes on a shared machine are faster than a block of steps; a round's ratio
    pairs its two sums.
    """
    spec = parse_spec(SPEC)
    trainers = [Trainer(spec, text, tmp / "a"), Trainer(spec, corpus, tmp / "b")]
    for tr in trainers:  # warm-up: allocator, first reads
        for _ in range(3):
            tr.train_step()
    rates: list[list[float]] = [[], []]
    ratios: list[float] = []
    for _ in range(rounds):
        spent = [0.0, 0.0]
        for s in range(steps):
            for k in (0, 1) if s % 2 == 0 else (1, 0):
                t0 = time.perf_counter()
                trainers[k].train_step()
                spent[k] += time.perf_counter() - t0
        work = steps * BATCH * SEQ_LEN
        rates[0].append(work / spent[0])
        rates[1].append(work / spent[1])
        ratios.append(spent[0] / spent[1])
    return statistics.median(rates[0]), statistics.median(rates[1]), statistics.median(ratios)


def child_rss(path: Path, cache: Path, mode: str) -> dict[str, float]:
    """In this process: train RSS_SPEC on the corpus (mode file: token cache; text: read whole), report."""
    t0 = time.perf_counter()
    source = CorpusFile(path, cache) if mode == "file" else path.read_text(encoding="utf-8")
    result = Trainer(parse_spec(RSS_SPEC), source, cache.parent / f"out-{mode}-{path.stem}").run()
    assert result.status == "succeeded", result.error
    return {"peak_rss_mb": peak_rss_mb(), "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": time.perf_counter() - t0}


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM where Linux has it, else ru_maxrss.

    Linux carries ru_maxrss over exec from the process that forked the child, so a child of a large
    parent (this bench, after its speed part) would report the parent's peak; VmHWM belongs to the
    child's own address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_rss(path: Path, cache: Path, mode: str) -> dict[str, float]:
    """Peak RSS of a fresh process training from `path`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", str(path), str(cache), mode], env=env,
                         capture_output=True, text=True, timeout=3600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed(args: argparse.Namespace, tmp: Path) -> tuple[float, float | None]:
    """Print batch and trainer tokens/s of both forms; return the ratios token file / in-memory (batches, steps)."""
    speed_path = make_corpus(tmp / "speed.txt", int(args.speed_mb * 1e6))
    corpus = CorpusFile(speed_path, tmp / "tokens")
    text = speed_path.read_text(encoding="utf-8")
    in_memory = load_text_data(text, ByteTokenizer(), SEQ_LEN, 0.1)
    mapped = data_for(corpus, tokenizer_for(TokenizerConfig(kind="byte"), corpus), SEQ_LEN, 0.1)
    b_mem, b_map, b_ratio = bench_batches(in_memory, mapped, args.batch_rounds, args.batches)
    print(f"batches ({args.speed_mb:g} MB corpus, {BATCH} x {SEQ_LEN}): in-memory int64 {b_mem / 1e6:.1f}M tok/s, "
          f"memmap uint16 {b_map / 1e6:.1f}M tok/s, ratio {b_ratio:.3f}")
    if args.steps == 0:
        return b_ratio, None
    t_mem, t_map, t_ratio = bench_trainers(text, corpus, args.rounds, args.steps, tmp)
    print(f"trainer steps (transformer 2 x 64): in-memory {t_mem:,.0f} tok/s, memmap {t_map:,.0f} tok/s, "
          f"ratio {t_ratio:.3f}")
    return b_ratio, t_ratio


def rss(args: argparse.Namespace, tmp: Path) -> float:
    """Print peak RSS per corpus size; return large minus small (MB)."""
    small = make_corpus(tmp / "small.txt", 1_000_000)
    large = make_corpus(tmp / "large.txt", int(args.large_mb * 1e6))
    large_name = f"{args.large_mb:g} MB"
    rows = {"1 MB": measure_rss(small, tmp / "tokens", "file"),
            large_name: measure_rss(large, tmp / "tokens", "file"),
            f"{large_name}, cached": measure_rss(large, tmp / "tokens", "file")}
    if args.baseline_rss:
        rows["1 MB, in-memory (before)"] = measure_rss(small, tmp / "tokens-text", "text")
        mid = make_corpus(tmp / "mid.txt", 20_000_000)
        rows["20 MB, in-memory (before)"] = measure_rss(mid, tmp / "tokens-text", "text")
    for name, row in rows.items():
        print(f"peak RSS {name:>26}: {row['peak_rss_mb']:7.1f} MB  (ru_maxrss {row['ru_maxrss_mb']:.1f} MB; "
              f"{row['seconds']:.1f} s incl. tokenizing)")
    return rows[large_name]["peak_rss_mb"] - rows["1 MB"]["peak_rss_mb"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="trainer steps per block (0: batches only)")
    parser.add_argument("--batches", type=int, default=200, help="batches per block (batching alone)")
    parser.add_argument("--batch-rounds", type=int, default=30,
                        help="rounds of batching alone (a block takes ~10 ms, so more rounds steady the median)")
    parser.add_argument("--speed-mb", type=float, default=20, help="corpus size of the speed part")
    parser.add_argument("--large-mb", type=float, default=200)
    parser.add_argument("--baseline-rss", action="store_true", help="also today's in-memory path (1 and 20 MB)")
    parser.add_argument("--parts", default="speed,rss", help="speed, rss or both (comma-separated)")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpora in /tmp")
    parser.add_argument("--child", nargs=3, metavar=("CORPUS", "CACHE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_rss(Path(args.child[0]), Path(args.child[1]), args.child[2])))
        return 0
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="stabletrain-data-bench-", dir="/tmp"))
    try:
        parts = set(args.parts.split(","))
        batch_ratio, ratio = speed(args, tmp) if "speed" in parts else (None, None)
        if "rss" in parts:
            print(f"rss_delta_mb: {rss(args, tmp):.1f}")
        if batch_ratio is not None:
            print(f"batch_ratio: {batch_ratio:.3f}")
        if ratio is not None:
            print(f"ratio: {ratio:.3f}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
