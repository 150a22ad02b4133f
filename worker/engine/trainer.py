"""The training loop: one optimizer step at a time, with stabilizers and monitoring.

`Trainer` knows nothing of the service: the worker plugs in through
`Callbacks` (metrics, layer stats, events, checkpoints, cancellation). Every
step reads one packed tensor back to the host (loss, norms, loss scale) to
decide skip/rollback; everything else stays on the device until a flush.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, checkpoint_path, load_checkpoint, save_checkpoint
from .config import JobSpec, TrainingConfig, spec_to_dict
from .data import load_text_data
from .diagnosis import diagnose, summarize
from .models import build_model
from .monitor import (
    HealthTracker,
    PendingLayerStats,
    RunHistory,
    layer_grad_norms,
    layer_update_stats,
    snapshot,
)
from .stabilizers import ExplosionDetector, GradClipper, apply_weight_max_norm
from .tokenizers import build_tokenizer, tokenizer_from_state

log = logging.getLogger(__name__)

# Steps between metric flushes to the callbacks (and the one time layer stats leave the device).
FLUSH_EVERY = 25
FLUSH_SECONDS = 2.0
# Under on_explosion=rollback, a state counts as healthy after this many calm steps in a row.
HEALTHY_AFTER = 10


class Callbacks:
    """No-op hooks; the worker and the CLI subclass this."""

    def on_metrics(self, rows: list[dict[str, Any]]) -> None:
        """A batch of per-step rows, in step order."""

    def on_layer_stats(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Per-layer gradient norm, weight norm and update ratio at `step`."""

    def on_event(self, event: dict[str, Any]) -> None:
        """A lifecycle or stability event: {step, kind, message, data}."""

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        """A checkpoint file is complete on disk."""

    def on_checkpoint_removed(self, info: dict[str, Any]) -> None:
        """keep_last is about to delete this checkpoint file."""

    def should_stop(self) -> bool:
        """Polled every step; True stops the run with a final checkpoint."""
        return False


@dataclass
class TrainResult:
    status: str  # succeeded, failed, cancelled
    step: int
    error: str | None
    diagnosis: list[dict[str, Any]]
    checkpoint: dict[str, Any] | None

    @property
    def summary(self) -> str:
        return summarize(self.diagnosis)


class TrainingFailed(Exception):
    """The run cannot go on; the message is meant for the user."""


def lr_at(step: int, cfg: TrainingConfig) -> float:
    """Learning rate for 1-based optimizer `step`: warmup, then the schedule."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - floor) * progress
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - floor)


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """Optimizer with weight decay on weight matrices only (not biases, norms)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_device_support(spec: JobSpec, device: torch.device) -> None:
    # oneDNN has no fp16 recurrent kernels: fail with a fix instead of a kernel error mid-step.
    recurrent = spec.model.arch in ("rnn", "gru", "lstm")
    if device.type == "cpu" and spec.stabilization.precision == "fp16" and recurrent:
        raise ValueError("stabilization.precision: fp16 recurrent layers need a GPU; use bf16 or fp32 on CPU")


class Trainer:
    """Trains one job spec on one text, reporting through callbacks."""

    def __init__(
        self,
        spec: JobSpec,
        text: str,
        out_dir: Path,
        callbacks: Callbacks | None = None,
        device: str = "cpu",
        resume_from: Path | None = None,
    ) -> None:
        self.spec = spec
        self.cb = callbacks or Callbacks()
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        _check_device_support(spec, self.device)
        resume = load_checkpoint(resume_from) if resume_from else None
        t = spec.training
        self.tokenizer = (
            tokenizer_from_state(resume["tokenizer"]) if resume else build_tokenizer(spec.tokenizer, text)
        )
        # On a GPU the token stream lives there, so a batch is a gather on the device, not a copy.
        self.data = load_text_data(text, self.tokenizer, t.seq_len, t.val_fraction).to(self.device)
        torch.manual_seed(t.seed)  # model init and dropout are reproducible from the seed
        self.model = build_model(spec.model, self.tokenizer.vocab_size, t.seq_len).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        named = dict(self.model.named_parameters())
        self.layer_names: list[str] = list(self.model.layer_names())
        self.weights = [named[n] for n in self.layer_names]
        self.optimizer = build_optimizer(self.model, t)
        stab = spec.stabilization
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=stab.precision == "fp16")
        # AGC leaves the output layer alone (Brock et al. 2021).
        self.clipper = GradClipper(stab.clip, self.params, self.weights[:-1] or self.weights)
        self.detector = ExplosionDetector(stab.explosion_factor)
        self.health = HealthTracker()
        self.history = RunHistory()
        self.data_gen = torch.Generator().manual_seed(t.seed)
        self.step = 0
        self.tokens_seen = 0
        self.lr_scale = 1.0
        self.consecutive_skips = 0
        self.rollbacks = 0
        self.calm_steps = 0
        self.healthy_state: dict[str, Any] | None = None
        self.pending_rows: list[dict[str, Any]] = []
        self.pending_layers: list[PendingLayerStats] = []
        self.last_flush = time.monotonic()
        self.last_checkpoint: dict[str, Any] | None = None
        self.last_val_loss: float | None = None
        self.tokens_per_step = t.batch_size * t.seq_len * t.grad_accum_steps
        if resume:
            self._load_state(resume)

    # ---- the run -------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to max_steps (or until stopped); never raises for training trouble."""
        max_steps = self.spec.training.max_steps
        self._event("resumed" if self.step else "started",
                    f"{'resumed at' if self.step else 'started'} step {self.step} of {max_steps} on {self.device}",
                    {"params": sum(p.numel() for p in self.params), "device": str(self.device)})
        if self.spec.stabilization.on_explosion == "rollback" and self.healthy_state is None:
            self._keep_healthy_state()  # the starting point is the first known-good state
        try:
            while self.step < max_steps:
                if self.cb.should_stop():
                    return self._finish_cancelled()
                self.train_step()
                if self.step % self.spec.checkpointing.every_steps == 0 and self.step < max_steps:
                    self.save()
            return self._finish_succeeded()
        except TrainingFailed as exc:
            return self._finish_failed(str(exc))

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum_steps micro-batches; returns its row."""
        t = self.spec.training
        stab = self.spec.stabilization
        step = self.step + 1
        started = time.perf_counter()
        lr = lr_at(step, t) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss = self._forward_backward()
        self.scaler.unscale_(self.optimizer)
        want_layers = step % self.spec.monitoring.layer_stats_every == 0
        grad_norms = layer_grad_norms(self.weights) if want_layers else None
        clip = self.clipper.clip()
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        # The one host sync of the step: everything the skip/rollback decision needs.
        loss_v, pre, post = torch.stack([loss.float(), clip.pre_norm.float(), clip.post_norm.float()]).tolist()
        finite = math.isfinite(loss_v) and math.isfinite(pre)
        reason = self._trouble(finite, loss_v, pre, step)
        before = snapshot(self.weights) if want_layers and reason is None else None
        skipped = reason is not None
        failure: TrainingFailed | None = None
        if skipped:
            try:
                self._skip_step(step, reason, finite, loss_v)
            except TrainingFailed as exc:
                failure = exc  # the failing step is still recorded below
        else:
            self._apply_step(loss_v, pre, post)
        self.step = step
        self.tokens_seen += self.tokens_per_step
        clipped = finite and not skipped and post < pre * (1 - 1e-6)
        if grad_norms is not None:
            self._record_layers(step, grad_norms, before)
        row = {
            "step": step, "loss": loss_v, "lr": lr, "grad_norm": pre, "grad_norm_clipped": post,
            "clipped": clipped, "nonfinite": not finite and not self._is_scale_overflow(finite, loss_v),
            "skipped": skipped, "loss_scale": scale,
            "tokens_per_s": self.tokens_per_step / max(time.perf_counter() - started, 1e-9),
            "tokens_seen": self.tokens_seen, "val_loss": None, "time": time.time(),
        }
        if failure is None and (step % t.eval_every == 0 or step == t.max_steps):
            row["val_loss"] = self.last_val_loss = self.evaluate()
        self._after_step(row, stab.clip.mode != "none")
        if failure is not None:
            raise failure
        return row

    def _forward_backward(self) -> torch.Tensor:
        """Accumulate gradients over the window; loss normalized over all its tokens."""
        t = self.spec.training
        total = torch.zeros((), device=self.device)
        for _ in range(t.grad_accum_steps):
            x, y = self.data.batch("train", t.batch_size, self.data_gen)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with _autocast(self.device, self.spec.stabilization.precision):
                logits = self.model(x)
            # Equal-sized micro-batches: mean / accum == mean over the whole window (one big batch).
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / t.grad_accum_steps
            self.scaler.scale(loss).backward()
            total += loss.detach()
        return total

    def _is_scale_overflow(self, finite: bool, loss: float) -> bool:
        # fp16 dynamic loss scaling overflows on purpose now and then; the loss itself is fine.
        return not finite and self.scaler.is_enabled() and math.isfinite(loss)

    def _trouble(self, finite: bool, loss: float, grad_norm: float, step: int) -> str | None:
        """Why this step must not be applied, or None."""
        stab = self.spec.stabilization
        if not finite:
            if self._is_scale_overflow(finite, loss):
                return "fp16 loss scale overflow"
            return f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step}"
        if stab.on_explosion == "none":
            return None
        return self.detector.check(loss, grad_norm)

    def _skip_step(self, step: int, reason: str, finite: bool, loss: float) -> None:
        stab = self.spec.stabilization
        # GradScaler must still update (it lowers the scale on overflow); step() skips by itself.
        if self.scaler.is_enabled():
            if not finite:
                self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        scale_overflow = self._is_scale_overflow(finite, loss)
        if not finite and not scale_overflow:
            self.health.alarm(step)
            self._event("nonfinite", f"{reason}; step skipped", {"policy": stab.nonfinite})
            if stab.nonfinite == "stop":
                raise TrainingFailed(
                    f"{reason} (stabilization.nonfinite is 'stop'); enable clipping or lower training.lr")
            if stab.on_explosion == "rollback":
                self._rollback(step, reason)
                return
        elif finite:
            self.health.warn(step)
            self._event("loss_spike", reason, {"policy": stab.on_explosion})
            if stab.on_explosion == "rollback":
                self._rollback(step, reason)
                return
        self.consecutive_skips += 1
        self._event("step_skipped", f"step {step} skipped: {reason}", {"consecutive": self.consecutive_skips})
        if self.consecutive_skips >= stab.max_consecutive_skips:
            raise TrainingFailed(
                f"{self.consecutive_skips} steps in a row skipped, last at step {step} ({reason}); "
                "the run is diverging: enable clipping, lower training.lr or use bf16")

    def _apply_step(self, loss: float, pre: float, post: float) -> None:
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.spec.stabilization.weight_max_norm is not None:
            apply_weight_max_norm(self.weights, self.spec.stabilization.weight_max_norm)
        self.consecutive_skips = 0
        self.clipper.observe(pre, post)
        self.detector.observe(loss, pre)

    def _rollback(self, step: int, reason: str) -> None:
        """Return to the last healthy state and lower the learning rate."""
        stab = self.spec.stabilization
        if self.healthy_state is None:
            self.consecutive_skips += 1
            self._event("step_skipped", f"step {step} skipped: {reason} (no healthy state yet)", {})
            return
        if self.rollbacks >= stab.max_rollbacks:
            raise TrainingFailed(
                f"training kept exploding after {self.rollbacks} rollbacks (last at step {step}: {reason}); "
                f"lower training.lr (now x{self.lr_scale:g}) or tighten clipping")
        self.rollbacks += 1
        to_step = self.healthy_state["step"]
        self.model.load_state_dict(self.healthy_state["model"])
        self.optimizer.load_state_dict(self.healthy_state["optimizer"])
        self.lr_scale *= stab.rollback_lr_factor
        self.health.alarm(step)
        self._event("rollback", f"rolled back to the state of step {to_step} after: {reason}",
                    {"to_step": to_step, "rollbacks": self.rollbacks})
        self._event("lr_lowered", f"learning rate scaled to x{self.lr_scale:g}", {"lr_scale": self.lr_scale})

    def _keep_healthy_state(self) -> None:
        """Remember a known-good state to roll back to (only under on_explosion: rollback)."""
        self.healthy_state = {
            "step": self.step,
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def _record_layers(self, step: int, grad_norms: torch.Tensor, before: list[torch.Tensor] | None) -> None:
        if before is None:  # skipped step: nothing moved
            weight_norms = torch.stack(torch._foreach_norm([w.detach() for w in self.weights])).float()
            ratios = torch.zeros_like(weight_norms)
        else:
            weight_norms, ratios = layer_update_stats(self.weights, before)
        self.pending_layers.append(PendingLayerStats(step, grad_norms, weight_norms, ratios))

    def _after_step(self, row: dict[str, Any], clipping: bool) -> None:
        if self.health.observe(row["clipped"]) and clipping:
            self._event("clip_burst", f"{self.health.clip_streak} consecutive steps clipped up to step {row['step']}",
                        {"grad_norm": row["grad_norm"]})
        row["health"] = self.health.state(row["step"])
        self.history.add_step(row)
        self.pending_rows.append(row)
        self.calm_steps = 0 if row["skipped"] or row["nonfinite"] else self.calm_steps + 1
        if (self.spec.stabilization.on_explosion == "rollback" and self.calm_steps >= HEALTHY_AFTER
                and row["step"] % HEALTHY_AFTER == 0):
            self._keep_healthy_state()
        if len(self.pending_rows) >= FLUSH_EVERY or time.monotonic() - self.last_flush > FLUSH_SECONDS:
            self.flush()

    # ---- reporting ---------------------------------------------------------------------

    def flush(self) -> None:
        """Hand pending step rows and layer stats to the callbacks (one device read)."""
        if self.pending_rows:
            rows, self.pending_rows = self.pending_rows, []
            self.cb.on_metrics(rows)
        for pending in self.pending_layers:
            rows = pending.rows(self.layer_names)
            for r in rows:
                self.history.layers.append({"step": pending.step, **r})
            self.cb.on_layer_stats(pending.step, rows)
        self.pending_layers = []
        self.last_flush = time.monotonic()

    def _event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        event = {"step": self.step, "kind": kind, "message": message, "data": data}
        self.history.events.append(event)
        log.info("%s: %s", kind, message)
        self.cb.on_event(event)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over a fixed set of windows (same windows every time)."""
        t = self.spec.training
        gen = torch.Generator().manual_seed(t.seed + 1)
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for _ in range(t.eval_batches):
            x, y = self.data.batch("val", t.batch_size, gen)
            x, y = x.to(self.device), y.to(self.device)
            with _autocast(self.device, self.spec.stabilization.precision):
                logits = self.model(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        self.model.train(was_training)
        return (total / t.eval_batches).item()

    def diagnose(self) -> list[dict[str, Any]]:
        """Findings over the whole run so far."""
        return diagnose(self.history.step_rows(), self.history.layers, self.history.events,
                        spec_to_dict(self.spec))

    # ---- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically from this step."""
        state: dict[str, Any] = {
            "spec": spec_to_dict(self.spec),
            "tokenizer": self.tokenizer.state_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"lr_scale": self.lr_scale},
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "rng": {
                "data": self.data_gen.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            },
            "monitor": {
                "history": self.history.state_dict(),
                "clipper": self.clipper.state_dict(),
                "detector": self.detector.state_dict(),
                "consecutive_skips": self.consecutive_skips,
                "rollbacks": self.rollbacks,
                "calm_steps": self.calm_steps,
            },
            "val_loss": self.last_val_loss,
            "health": self.health.state(self.step),
        }
        if self.healthy_state is not None:
            state["healthy_state"] = self.healthy_state
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.lr_scale = state["scheduler"]["lr_scale"]
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.data_gen.set_state(state["rng"]["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        monitor = state["monitor"]
        self.history.load_state_dict(monitor["history"])
        self.history.truncate_after(self.step)
        self.clipper.load_state_dict(monitor["clipper"])
        self.detector.load_state_dict(monitor["detector"])
        self.consecutive_skips = monitor["consecutive_skips"]
        self.rollbacks = monitor["rollbacks"]
        self.calm_steps = monitor["calm_steps"]
        self.last_val_loss = state["val_loss"]
        self.healthy_state = state.get("healthy_state")

    def save(self) -> dict[str, Any] | None:
        """Write a checkpoint of the current step; a storage failure is an event, not a crash."""
        self.flush()  # every row up to this step reaches the callbacks before the checkpoint
        path = checkpoint_path(self.out_dir, self.step)
        try:
            written = save_checkpoint(path, self.state_dict())
        except (OSError, CheckpointError, RuntimeError) as exc:
            self._event("checkpoint_failed", f"checkpoint at step {self.step} not written: {exc}",
                        {"previous": self.last_checkpoint and self.last_checkpoint["step"]})
            return None
        info = {"step": self.step, "path": str(path), **written,
                "val_loss": self.last_val_loss, "health": self.health.state(self.step)}
        self.last_checkpoint = info
        self._event("checkpoint", f"checkpoint written at step {self.step}",
                    {"bytes": written["bytes"], "sha256": written["sha256"]})
        self.cb.on_checkpoint(info)
        self._prune_checkpoints()
        return info

    def _prune_checkpoints(self) -> None:
        keep = self.spec.checkpointing.keep_last
        existing = sorted(self.out_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        for old in existing[:-keep]:
            # Record first, file second: a listed checkpoint always has its file.
            self.cb.on_checkpoint_removed({"step": int(old.stem.split("_")[1]), "path": str(old)})
            old.unlink(missing_ok=True)

    # ---- endings -----------------------------------------------------------------------

    def _finish_succeeded(self) -> TrainResult:
        if not self.last_checkpoint or self.last_checkpoint["step"] != self.step:
            self.save()
        self.flush()
        findings = self.diagnose()
        self._event("finished", f"finished {self.step} steps; {summarize(findings).splitlines()[0]}",
                    {"val_loss": self.last_val_loss})
        return TrainResult("succeeded", self.step, None, findings, self.last_checkpoint)

    def _finish_cancelled(self) -> TrainResult:
        self.save()
        self.flush()
        self._event("cancelled", f"cancelled at step {self.step}", {})
        return TrainResult("cancelled", self.step, None, self.diagnose(), self.last_checkpoint)

    def _finish_failed(self, error: str) -> TrainResult:
        # No checkpoint of the broken state: the last healthy ones stay as they are.
        self.flush()
        findings = self.diagnose()
        self._event("failed", error, {})
        return TrainResult("failed", self.step, error, findings, self.last_checkpoint)
