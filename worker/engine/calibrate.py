"""A device's training throughput, measured on a reference run (for the dry run's wall-time estimate).

The figure is FLOPs/s in the dry run's own counting (worker/engine/estimate.py), measured through the
real Trainer (monitoring off), so the trainer's per-step overhead is in it as it is in a job.
"""

from __future__ import annotations

import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from worker.engine import estimate
from worker.engine.config import parse_spec, spec_to_dict
from worker.engine.trainer import Trainer

# A small GPT-like model: big enough that matmuls dominate the step, small enough to run in seconds on a CPU.
REFERENCE_SPEC: dict[str, Any] = {
    "name": "calibration",
    "model": {"arch": "transformer", "n_layers": 2, "d_model": 128, "n_heads": 4},
    "training": {"max_steps": 1000, "batch_size": 16, "seq_len": 64, "eval_every": 1000},
    "monitoring": {"activation_stats": False, "layer_stats_every": 1000},
}
WARMUP_STEPS = 2
TIMED_STEPS = 6


def device_class(device: str) -> str:
    """"cuda:<device name>" or "cpu:<processor model>": what a measured figure is valid for."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    return f"{dev.type}:{_cpu_model()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _reference_text(n_chars: int = 40_000) -> str:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    out: list[str] = []
    while sum(map(len, out)) < n_chars:
        out.append(rng.choice(words))
    return " ".join(out)


def measure_throughput(device: str = "cpu", warmup: int = WARMUP_STEPS, steps: int = TIMED_STEPS) -> dict[str, Any]:
    """Time `steps` optimizer steps of REFERENCE_SPEC after `warmup`; returns flops_per_s and the run's details."""
    spec = parse_spec(REFERENCE_SPEC)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(spec, _reference_text(), Path(tmp), device=device, sync_every=steps + warmup)
        for _ in range(warmup):
            trainer.train_step()
        trainer.sync()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        trainer.sync()  # reads the step values back: the device has finished the timed steps
        seconds = time.perf_counter() - start
        vocab = trainer.tokenizer.vocab_size
    figures = estimate.estimate(spec_to_dict(spec), vocab)
    flops_per_step = 6 * figures["flop_params"] * figures["tokens_per_step"]
    return {"device_class": device_class(device), "flops_per_s": flops_per_step * steps / seconds,
            "steps": steps, "seconds": seconds, "flops_per_step": flops_per_step,
            "reference": {"params": figures["params"], "tokens_per_step": figures["tokens_per_step"]}}
