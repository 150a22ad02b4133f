"""LR range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks", section 3.3).

Trains a fresh copy of the spec's model on the spec's data and optimizer for up to `steps` steps with
the learning rate growing geometrically from lr_min to lr_max, and records the loss against it. The
raw loss is smoothed by an exponential moving average with bias correction (the first values are not
pulled toward zero); the test stops early once the smoothed loss is non-finite or exceeds
DIVERGE_FACTOR times its best. It writes no files and touches no job state.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from worker.engine.config import RULES, JobSpec
from worker.engine.corpus import CorpusFile, data_for, tokenizer_for
from worker.engine.models import build_model
from worker.engine.stabilizers import GradClipper
from worker.engine.trainer import build_optimizer

SMOOTHING = 0.98  # EMA weight of the past (fast.ai's lr_find default)
DIVERGE_FACTOR = 4.0
# Points skipped at the start of the slope search: the average still mostly reflects the first losses.
SLOPE_SKIP_FRACTION = 0.1
# Slopes are taken over this many points either side (the smoothed curve still wiggles step to step).
SLOPE_HALF_WINDOW = 3
# The recommendation stays this far below the divergence lr.
DIVERGENCE_MARGIN = 10.0


def geometric_lrs(lr_min: float, lr_max: float, steps: int) -> list[float]:
    """`steps` learning rates from lr_min to lr_max, equally spaced in log lr."""
    if steps == 1:
        return [lr_min]
    ratio = (lr_max / lr_min) ** (1 / (steps - 1))
    return [lr_min * ratio**i for i in range(steps)]


def lr_range_test(spec: JobSpec, text: str | CorpusFile, lr_min: float = 1e-7, lr_max: float = 10.0, steps: int = 200,
                  device: str = "cpu") -> dict[str, Any]:
    """Run the test; returns the curve, the steepest-descent and divergence lrs and a recommendation."""
    t = spec.training
    tokenizer = tokenizer_for(spec.tokenizer, text)
    data = data_for(text, tokenizer, t.seq_len, t.val_fraction).to(torch.device(device))
    torch.manual_seed(t.seed)
    model = build_model(spec.model, tokenizer.vocab_size, t.seq_len).to(device)
    model.train()
    optimizer = build_optimizer(model, replace(t, lr=lr_min))
    params = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in params if p.dim() >= 2]
    clipper = GradClipper(spec.stabilization.clip, params, weights)
    gen = torch.Generator().manual_seed(t.seed)
    curve: list[dict[str, float | None]] = []
    avg, best, diverged_at = 0.0, math.inf, None
    for i, lr in enumerate(geometric_lrs(lr_min, lr_max, steps)):
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = _step(model, optimizer, clipper, data, t.batch_size, t.grad_accum_steps, gen, device)
        if math.isfinite(loss):
            avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
            smoothed = avg / (1 - SMOOTHING ** (i + 1))
        else:
            smoothed = math.inf
        curve.append({"lr": lr, "loss": loss if math.isfinite(loss) else None,
                      "smoothed": smoothed if math.isfinite(smoothed) else None})
        if not math.isfinite(smoothed) or smoothed > DIVERGE_FACTOR * best:
            diverged_at = lr
            break
        best = min(best, smoothed)
    return summarize(curve, diverged_at, lr_min, lr_max)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, clipper: GradClipper, data: Any,
          batch_size: int, accum: int, gen: torch.Generator, device: str) -> float:
    """One optimizer step over `accum` micro-batches (as the trainer takes it, in fp32); the mean loss."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for _ in range(accum):
        x, y = data.batch("train", batch_size, gen)
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / accum
        loss.backward()
        total += float(loss.detach())
    if not math.isfinite(total):
        return total
    clipper.clip()
    optimizer.step()
    return total


def steepest_descent_lr(curve: list[dict[str, Any]]) -> float | None:
    """The lr where the smoothed loss falls fastest against log lr (most negative central slope)."""
    points = [(math.log(p["lr"]), p["smoothed"]) for p in curve if p["smoothed"] is not None]
    start = max(SLOPE_HALF_WINDOW, int(len(points) * SLOPE_SKIP_FRACTION))
    best_slope, best_lr = 0.0, None
    for i in range(start, len(points) - SLOPE_HALF_WINDOW):
        (x0, y0), (x1, y1) = points[i - SLOPE_HALF_WINDOW], points[i + SLOPE_HALF_WINDOW]
        slope = (y1 - y0) / (x1 - x0)
        if slope < best_slope:
            best_slope, best_lr = slope, math.exp(points[i][0])
    return best_lr


def recommended_lr(steepest: float | None, divergence: float | None) -> float | None:
    """The steepest-descent lr, capped at divergence / DIVERGENCE_MARGIN, inside training.lr's bounds."""
    candidates = [v for v in (steepest, divergence / DIVERGENCE_MARGIN if divergence else None) if v]
    if not candidates:
        return None
    bound = RULES["training.lr"]
    value = float(f"{min(min(candidates), bound.hi):.3g}")  # three significant digits: a value to type
    return value if bound(value) else None


def summarize(curve: list[dict[str, Any]], diverged_at: float | None, lr_min: float, lr_max: float) -> dict[str, Any]:
    """The probe's result record (JSON-able)."""
    steepest = steepest_descent_lr(curve)
    lr = recommended_lr(steepest, diverged_at)
    finite = [p for p in curve if p["smoothed"] is not None]
    best = min(finite, key=lambda p: p["smoothed"]) if finite else None
    return {
        "lr_min": lr_min, "lr_max": lr_max, "steps_run": len(curve), "curve": curve,
        "steepest_lr": steepest, "divergence_lr": diverged_at,
        "min_loss_lr": best["lr"] if best else None, "min_smoothed_loss": best["smoothed"] if best else None,
        "recommended": {"field": "training.lr", "value": lr} if lr is not None else None,
    }
