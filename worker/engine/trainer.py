"""The training loop: one optimizer step at a time, with stabilizers and monitoring.

`Trainer` knows nothing of the service: the worker plugs in through
`Callbacks` (metrics, layer stats, events, checkpoints, cancellation, pause).

Each step is judged on the device (healthy, non-finite, explosion) and a bad
step is skipped there too, through the fused optimizers' `found_inf` input
(the mechanism torch's GradScaler uses). The host reads the step values back
in one packed tensor every `sync_every` steps (1 on CPU, where a read is
free; more on a GPU, so the loop never waits on the host) and only then
counts skips, writes events, rolls back or fails the run.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .activations import ActivationMonitor, PendingActivationStats
from .budget import CostBudget
from .checkpoint import CheckpointError, checkpoint_path, load_checkpoint, save_checkpoint
from .config import JobSpec, TrainingConfig, spec_to_dict
from .corpus import CorpusFile, data_for, tokenizer_for
from .diagnosis import diagnose, health_of, summarize
from .models import build_model
from .monitor import (
    HealthTracker,
    PendingLayerStats,
    RunHistory,
    layer_grad_norms,
    layer_update_stats,
    snapshot,
)
from .parallel import SingleDevice
from .stabilizers import GradClipper, SpikeGuard, apply_weight_max_norm
from .tokenizers import tokenizer_from_state

log = logging.getLogger(__name__)

# Steps between metric flushes to the callbacks (and the one time layer stats leave the device).
FLUSH_EVERY = 25
FLUSH_SECONDS = 2.0
# Under on_explosion=rollback, a state counts as healthy after this many calm steps in a row.
HEALTHY_AFTER = 10
# Steps between host reads of the step values on a GPU.
GPU_SYNC_EVERY = 16
# A live diagnosis waits this many times its own cost since the last one (at most ~1% of the run's
# time; long runs diagnose less often).
LIVE_DIAGNOSIS_COST_RATIO = 100
# The through-time probe (a forward and backward pass of one row through the recurrent layers) runs at
# a layer-stats step when this many times its cost has passed since the last one: at most ~0.5% of the
# run's time. On a GPU that is every layer-stats step; on a CPU LSTM (the probe costs ~15% of a
# step there) about every 3rd to 4th one at layer_stats_every 10.
THROUGH_TIME_COST_RATIO = 200
# A spike event names its worst rows with this much of their text.
EXCERPT_TOKENS = 120
EXCERPT_CHARS = 80


class Callbacks:
    """No-op hooks; the worker and the CLI subclass this."""

    def on_metrics(self, rows: list[dict[str, Any]]) -> None:
        """A batch of per-step rows, in step order."""

    def on_layer_stats(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Per-layer gradient norm, weight norm and update ratio at `step`."""

    def on_activation_stats(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Per-site activation statistics (and gradients through time) at `step`, in depth order."""

    def on_event(self, event: dict[str, Any]) -> None:
        """A lifecycle or stability event: {step, kind, message, data}."""

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        """A checkpoint file is complete on disk."""

    def on_checkpoint_removed(self, info: dict[str, Any]) -> None:
        """keep_last is about to delete this checkpoint file."""

    def on_diagnosis(self, findings: list[dict[str, Any]], summary: str) -> None:
        """The diagnosis so far, at metric flushes of a running job (throttled by its cost)."""

    def may_write_checkpoints(self) -> bool:
        """False once this run no longer owns its checkpoint folder (e.g. a lost lease)."""
        return True

    def should_stop(self) -> bool:
        """Polled every step; True stops the run with a final checkpoint."""
        return False

    def should_pause(self) -> bool:
        """Polled every step after should_stop; True ends the run with a checkpoint of this step and a
        "paused" result, from which a later Trainer(resume_from=...) continues bit-identically."""
        return False


@dataclass
class TrainResult:
    status: str  # succeeded, failed, cancelled, paused
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
    """Fused optimizer with weight decay on weight matrices only (not biases, norms).

    Fused kernels take a `found_inf` tensor and skip the update on the device,
    which is how a bad step is skipped without a host sync.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=True)
        if cfg.momentum:
            # A skipped first step would leave fused SGD an uninitialized buffer; zeros give the
            # same first update (buf = 0 * m + grad) and make skipping safe from step one.
            for p in decay + no_decay:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return optimizer
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)


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


def _same_layout(dst: Any, src: Any) -> bool:
    if isinstance(src, torch.Tensor):
        return isinstance(dst, torch.Tensor) and dst.shape == src.shape and dst.dtype == src.dtype
    if isinstance(src, dict):
        return isinstance(dst, dict) and dst.keys() == src.keys() and all(_same_layout(dst[k], src[k]) for k in src)
    if isinstance(src, (list, tuple)):
        return (isinstance(dst, type(src)) and len(dst) == len(src)
                and all(_same_layout(a, b) if isinstance(b, (torch.Tensor, dict, list, tuple)) else a == b
                        for a, b in zip(dst, src, strict=True)))
    return True  # a dict's plain values are replaced by _copy_values


def _copy_into(dst: Any, src: Any) -> bool:
    """Copy a (nested) state dict into one of the same layout in place; False, touching nothing, if the
    layouts differ. Values other than tensors are replaced (a dict's entries) or must already match."""
    if not _same_layout(dst, src):
        return False
    _copy_values(dst, src)
    return True


@torch.no_grad()
def _cloned(state: Any) -> Any:
    """A copy of a (nested) state dict with every tensor cloned: copy.deepcopy of the same state goes
    through each tensor's storage and memo and took ~65 ms for a 0.9M-parameter model and its Adam state."""
    if isinstance(state, dict):
        return {key: _cloned(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cloned(value) for value in state)
    if isinstance(state, torch.Tensor):
        return state.clone()
    return copy.deepcopy(state)


@torch.no_grad()
def _copy_values(dst: Any, src: Any) -> None:
    if isinstance(src, dict):
        for key, value in src.items():
            if isinstance(value, (torch.Tensor, dict, list, tuple)):
                _copy_values(dst[key], value)
            else:
                dst[key] = copy.deepcopy(value)
    elif isinstance(src, (list, tuple)):
        for a, b in zip(dst, src, strict=True):
            _copy_values(a, b)
    elif isinstance(src, torch.Tensor):
        dst.copy_(src)


@dataclass
class PendingStep:
    """A step that ran on the device and waits for the host to review it."""

    step: int
    lr: float
    values: torch.Tensor  # loss, grad norm pre/post clip, verdict, median norm, median loss, loss scale
    val_loss: float | None
    layers: PendingLayerStats | None
    activations: PendingActivationStats | None
    row_losses: torch.Tensor  # per-example loss of every row of the window (device)
    offsets: torch.Tensor  # each row's start in the token stream


def divergence_fixes(spec: JobSpec) -> str:
    """What to change in a spec whose steps keep diverging: only what it does not already do."""
    fixes = []
    if spec.stabilization.clip.mode == "none":
        fixes.append("enable clipping (stabilization.clip)")
    fixes.append("lower training.lr")
    if spec.stabilization.precision == "fp16":
        fixes.append("use bf16 (fp16 overflows at 65504)")
    return ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1]


class Trainer:
    """Trains one job spec on one text, reporting through callbacks.

    `text` is the corpus itself or a `CorpusFile`: a file is tokenized once into a cached token file
    that training reads memory-mapped (worker/engine/corpus.py), so the corpus is never held in memory.
    """

    def __init__(
        self,
        spec: JobSpec,
        text: str | CorpusFile,
        out_dir: Path,
        callbacks: Callbacks | None = None,
        device: str = "cpu",
        resume_from: Path | None = None,
        sync_every: int | None = None,
        parallel: SingleDevice | None = None,
    ) -> None:
        self.spec = spec
        # one device, or this process's rank of a data-parallel job (worker/engine/distributed.py)
        self.parallel = parallel or SingleDevice()
        self.cb = callbacks or Callbacks()
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        _check_device_support(spec, self.device)
        resume = load_checkpoint(resume_from) if resume_from else None
        t = spec.training
        self.tokenizer = (
            tokenizer_from_state(resume["tokenizer"]) if resume else tokenizer_for(spec.tokenizer, text)
        )
        # On a GPU an in-memory token stream lives there, so a batch is a gather on the device, not a
        # copy; a memory-mapped one stays on the host and only each batch is copied over.
        self.data = data_for(text, self.tokenizer, t.seq_len, t.val_fraction).to(self.device)
        torch.manual_seed(t.seed)  # model init and dropout are reproducible from the seed
        self.model = build_model(spec.model, self.tokenizer.vocab_size, t.seq_len).to(self.device)
        if self.parallel.rank:
            # every rank built the same model from the seed; dropout masks differ between ranks' rows
            torch.manual_seed(t.seed + self.parallel.rank)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        named = dict(self.model.named_parameters())
        self.layer_names: list[str] = list(self.model.layer_names())
        self.weights = [named[n] for n in self.layer_names]
        self.optimizer = build_optimizer(self.model, t)
        stab = spec.stabilization
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=stab.precision == "fp16")
        # AGC leaves the output layer alone (Brock et al. 2021); with tied embeddings that is the embedding.
        head = getattr(getattr(self.model, "head", None), "weight", None)
        agc_weights = [w for w in self.weights if w is not head] or self.weights
        self.clipper = GradClipper(stab.clip, self.params, agc_weights)
        self.guard = SpikeGuard(stab.explosion_factor, stab.on_explosion != "none", self.device)
        # statistics are reported by rank 0 alone, from its rows
        monitor_acts = spec.monitoring.activation_stats and self.parallel.is_primary
        self.act_monitor = ActivationMonitor(self.model) if monitor_acts else None
        self.pending_activations: list[PendingActivationStats] = []
        self.latest_findings: list[dict[str, Any]] | None = None
        self.sync_every = sync_every or (1 if self.device.type == "cpu" else GPU_SYNC_EVERY)
        self.pending_steps: list[PendingStep] = []
        self.diagnosis_budget = CostBudget(LIVE_DIAGNOSIS_COST_RATIO)
        self.probe_budget = CostBudget(THROUGH_TIME_COST_RATIO)
        self.last_sync = time.perf_counter()
        self.health = HealthTracker()
        self.history = RunHistory()
        self.data_gen = torch.Generator().manual_seed(t.seed)
        self.step = 0
        self.tokens_seen = 0
        self.lr_scale = 1.0
        self.consecutive_skips = 0
        self.rollbacks = 0
        self.calm_steps = 0
        # The last two calm states; a rollback goes to the older one, since the newer one may
        # already carry the trajectory that led to the spike.
        self.healthy_states: deque[dict[str, Any]] = deque(maxlen=2)
        self.pending_rows: list[dict[str, Any]] = []
        self.pending_layers: list[PendingLayerStats] = []
        self.last_flush = time.monotonic()
        self.last_checkpoint: dict[str, Any] | None = None
        self.last_val_loss: float | None = None
        self.tokens_per_step = t.batch_size * t.seq_len * t.grad_accum_steps
        if resume:
            self._load_state(resume)
        # what the forward-backward pass runs (DDP's wrapper when data parallel); self.model is the module
        self.trained_model = self.parallel.wrap(self.model)

    # ---- the run -------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to max_steps (or until stopped); never raises for training trouble."""
        max_steps = self.spec.training.max_steps
        self._event("resumed" if self.step else "started",
                    f"{'resumed at' if self.step else 'started'} step {self.step} of {max_steps} on {self.device}",
                    {"params": sum(p.numel() for p in self.params), "device": str(self.device)})
        if self.spec.stabilization.on_explosion == "rollback" and not self.healthy_states:
            self._keep_healthy_state()  # the starting point is the first known-good state
        try:
            while self.step < max_steps:
                if self.parallel.agree(self.cb.should_stop()):
                    return self._finish_cancelled()
                if self.parallel.agree(self.cb.should_pause()):
                    return self._finish_paused()
                self.train_step()
                if self.step % self.spec.checkpointing.every_steps == 0 and self.step < max_steps:
                    self.save()
            return self._finish_succeeded()
        except TrainingFailed as exc:
            return self._finish_failed(str(exc))

    def train_step(self) -> None:
        """One optimizer step over grad_accum_steps micro-batches, judged and applied on the device."""
        t = self.spec.training
        step = self.step + 1
        lr = lr_at(step, t) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not self.model.training:  # Module.train() walks every submodule: ~1 ms a step on a small net
            self.model.train()
        want_layers = step % self.spec.monitoring.layer_stats_every == 0 and self.parallel.is_primary
        monitor_acts = want_layers and self.act_monitor is not None
        loss, row_losses, offsets, first = self._forward_backward(monitor_acts)
        loss = self.parallel.average(loss)  # the global batch's loss, so every rank judges the same value
        activations = self._activation_stats(step, first) if monitor_acts else None
        self.scaler.unscale_(self.optimizer)  # no-op unless fp16: norms and clipping see true gradients
        grad_norms = layer_grad_norms(self.weights) if want_layers else None
        clip = self.clipper.clip()
        verdict, norm_median, loss_median = self.guard.judge(loss, clip.pre_norm)
        before = snapshot(self.weights) if want_layers else None
        self._apply_or_skip(verdict)
        self.guard.observe(loss, clip.pre_norm, verdict)
        self.step = step
        self.tokens_seen += self.tokens_per_step
        layers = None
        if want_layers:
            layers = PendingLayerStats(step, grad_norms, *layer_update_stats(self.weights, before))
        scale = self.scaler._get_scale_async() if self.scaler.is_enabled() else torch.ones((), device=self.device)
        values = torch.stack([loss.float(), clip.pre_norm.float(), clip.post_norm.float(), verdict.float(),
                              norm_median, loss_median, scale.float()])
        val_loss = self.evaluate() if step % t.eval_every == 0 or step == t.max_steps else None
        if val_loss is not None:
            self.last_val_loss = val_loss
        self.pending_steps.append(PendingStep(step, lr, values, val_loss, layers, activations, row_losses, offsets))
        if len(self.pending_steps) >= self.sync_every:
            self.sync()

    def _forward_backward(
        self, monitor_acts: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Accumulate gradients over the window; loss normalized over all its tokens.

        Returns the loss, every row's own loss and stream offset (for spike attribution)
        and the first micro-batch (for the through-time probe). With `monitor_acts`, the
        activation hooks see the first micro-batch's forward pass.
        """
        t = self.spec.training
        total = torch.zeros((), device=self.device)
        row_losses, offsets = [], []
        first: tuple[torch.Tensor, torch.Tensor] | None = None
        # Every rank draws the global batch one process would draw and trains its own rows of it.
        mine = self.parallel.rows(t.batch_size)
        with self.act_monitor.capture() if monitor_acts else nullcontext():
            for micro in range(t.grad_accum_steps):
                x, y, starts = self.data.batch_with_offsets("train", t.batch_size, self.data_gen)
                x, y = x[mine].to(self.device, non_blocking=True), y[mine].to(self.device, non_blocking=True)
                first = first or (x, y)
                with self.parallel.micro_step(self.trained_model, final=micro == t.grad_accum_steps - 1):
                    with _autocast(self.device, self.spec.stabilization.precision):
                        logits = self.trained_model(x)
                    token_losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
                    per_row = token_losses.view(x.shape).mean(dim=1)
                    # Equal-sized micro-batches: mean / accum == mean over the whole window (one big batch).
                    loss = per_row.mean() / t.grad_accum_steps
                    self.scaler.scale(loss).backward()
                total += loss.detach()
                row_losses.append(per_row.detach())
                offsets.append(starts)
        assert first is not None
        return total, torch.cat(row_losses), torch.cat(offsets), first

    def _activation_stats(self, step: int, first: tuple[torch.Tensor, torch.Tensor]) -> PendingActivationStats:
        """The hooks' statistics and, for recurrent nets when its budget allows, the through-time probe
        (device tensors; a step without the probe has no grad_time)."""
        assert self.act_monitor is not None
        grad_time = None
        last_stats_step = step + self.spec.monitoring.layer_stats_every > self.spec.training.max_steps
        # The run's last layer-stats step always probes: the final diagnosis sees the net as it ended.
        if self.act_monitor.recurrent and (self.probe_budget.due() or last_stats_step):
            self.probe_budget.start()
            grad_time = self.act_monitor.grad_through_time(*first)
            self.probe_budget.stop()
        return PendingActivationStats(step, self.act_monitor.collected(), grad_time)

    def _apply_or_skip(self, verdict: torch.Tensor) -> None:
        """Optimizer step that the fused kernel skips on the device when the verdict is bad."""
        # fp16 overflow makes the norm infinite, so the verdict covers the scaler's skip as well.
        self.optimizer.found_inf = (verdict != SpikeGuard.HEALTHY).float()
        self.optimizer.step()
        self.scaler.update()  # lowers the fp16 scale after an overflow; no-op otherwise
        self.optimizer.zero_grad(set_to_none=True)
        if self.spec.stabilization.weight_max_norm is not None:
            # Idempotent on a skipped step: the weights already satisfy the constraint.
            apply_weight_max_norm(self.weights, self.spec.stabilization.weight_max_norm)

    # ---- host review ------------------------------------------------------------------

    def sync(self, deliver: bool = False) -> None:
        """Read pending steps back (one host read), review them in order, deliver when due."""
        batch, self.pending_steps = self.pending_steps, []
        failure: TrainingFailed | None = None
        if batch:
            values = torch.stack([p.values for p in batch]).cpu().tolist()
            now = time.perf_counter()
            tokens_per_s = self.tokens_per_step * len(batch) / max(now - self.last_sync, 1e-9)
            self.last_sync = now
            rollbacks_before = self.rollbacks
            for pending, vals in zip(batch, values, strict=True):
                # Steps run after a rolled-back one trained weights that no longer exist: record, don't act.
                discarded = self.rollbacks != rollbacks_before
                failure = self._review(pending, vals, tokens_per_s, failure, discarded)
            self._maybe_keep_healthy_state()
        due = len(self.pending_rows) >= FLUSH_EVERY or time.monotonic() - self.last_flush > FLUSH_SECONDS
        if deliver or due or failure is not None:
            self._deliver()
        if failure is not None:
            raise failure

    def _review(self, pending: PendingStep, vals: list[float], tokens_per_s: float,
                failure: TrainingFailed | None, discarded: bool = False) -> TrainingFailed | None:
        """Act on one step's verdict and record its row; returns the run's failure, if any."""
        loss, pre, post, verdict, norm_median, loss_median, scale = vals
        verdict = int(verdict)
        overflow = verdict == SpikeGuard.NONFINITE and self.scaler.is_enabled() and math.isfinite(loss)
        if failure is None and not discarded:  # after a failure, later steps are recorded but not acted on
            try:
                if verdict == SpikeGuard.HEALTHY:
                    self._healthy(pre, post)
                else:
                    reason = ("fp16 loss scale overflow" if overflow else
                              self.guard.explain(verdict, loss, pre, norm_median, loss_median))
                    spike = (self._spike(pending, loss, pre, norm_median, loss_median)
                             if verdict == SpikeGuard.EXPLOSION else None)
                    self._troubled(pending.step, verdict, overflow, f"{reason} at step {pending.step}", spike)
            except TrainingFailed as exc:
                failure = exc
        skipped = verdict != SpikeGuard.HEALTHY or discarded
        row = {
            "step": pending.step, "loss": loss, "lr": pending.lr, "grad_norm": pre, "grad_norm_clipped": post,
            "clipped": not skipped and post < pre * (1 - 1e-6),
            "nonfinite": verdict == SpikeGuard.NONFINITE and not overflow and not discarded, "skipped": skipped,
            "loss_scale": scale, "tokens_per_s": tokens_per_s,
            "tokens_seen": pending.step * self.tokens_per_step, "val_loss": pending.val_loss, "time": time.time(),
        }
        if pending.layers is not None:
            self.pending_layers.append(pending.layers)
        if pending.activations is not None:
            self.pending_activations.append(pending.activations)
        self._record_row(row)
        return failure

    def _healthy(self, pre: float, post: float) -> None:
        self.consecutive_skips = 0
        self.calm_steps += 1
        self.clipper.observe(pre, post)

    def _spike(self, pending: PendingStep, loss: float, pre: float, norm_median: float,
               loss_median: float) -> tuple[str, dict[str, Any]]:
        """Event kind and data of an explosion verdict: which rule fired, by how much, and on which rows."""
        factor = self.spec.stabilization.explosion_factor
        if self.guard.grad_norm_jumped(pre, norm_median):
            kind, data = "grad_norm_spike", {"rule": "grad_norm", "value": pre, "median": norm_median}
        else:
            kind, data = "loss_spike", {"rule": "loss", "value": loss, "median": loss_median}
            factor = SpikeGuard.LOSS_FACTOR
        data |= {"factor": factor, "policy": self.spec.stabilization.on_explosion,
                 "attribution": self._attribution(pending)}
        return kind, data

    def _attribution(self, pending: PendingStep) -> dict[str, Any]:
        """Where in the dataset the spiking window came from, and its worst rows by their own loss."""
        offsets = [int(o) for o in pending.offsets.tolist()]
        losses = self.parallel.gather_rows(pending.row_losses, self.spec.training.grad_accum_steps).float().tolist()
        ranked = sorted(range(len(losses)), key=lambda i: losses[i] if math.isfinite(losses[i]) else math.inf,
                        reverse=True)
        top = [{"offset": offsets[i], "loss": losses[i] if math.isfinite(losses[i]) else None,
                "excerpt": self._excerpt(offsets[i])}
               for i in ranked[:self.spec.monitoring.attribution_top_k]]
        return {"offsets": offsets, "top": top}

    def _excerpt(self, offset: int) -> str:
        # A byte window can start inside a UTF-8 character: drop the partial one.
        text = self.tokenizer.decode(self.data.excerpt(offset, EXCERPT_TOKENS)).lstrip("\ufffd")
        return text[:EXCERPT_CHARS]

    def _troubled(self, step: int, verdict: int, overflow: bool, reason: str,
                  spike: tuple[str, dict[str, Any]] | None) -> None:
        """A step the device skipped: count it, say why, and stop or roll back per the policies."""
        stab = self.spec.stabilization
        self.calm_steps = 0
        if verdict == SpikeGuard.NONFINITE and not overflow:
            self.health.alarm(step)
            self._event("nonfinite", f"{reason}; step skipped", {"policy": stab.nonfinite}, step)
            if stab.nonfinite == "stop":
                raise TrainingFailed(
                    f"{reason} (stabilization.nonfinite is 'stop'); enable clipping or lower training.lr")
        elif spike is not None:  # an explosion verdict
            self.health.warn(step)
            self._event(spike[0], reason, spike[1], step)
        if not overflow and stab.on_explosion == "rollback":
            self._rollback(step, reason)
            return
        self.consecutive_skips += 1
        self._event("step_skipped", f"step {step} skipped: {reason}", {"consecutive": self.consecutive_skips}, step)
        if self.consecutive_skips >= stab.max_consecutive_skips:
            raise TrainingFailed(
                f"{self.consecutive_skips} steps in a row skipped, last at step {step} ({reason}); "
                f"the run is diverging: {divergence_fixes(self.spec)}")

    def _rollback(self, step: int, reason: str) -> None:
        """Return to the last healthy state and lower the learning rate."""
        stab = self.spec.stabilization
        if not self.healthy_states:
            self.consecutive_skips += 1
            self._event("step_skipped", f"step {step} skipped: {reason} (no healthy state yet)", {}, step)
            return
        if self.rollbacks >= stab.max_rollbacks:
            raise TrainingFailed(
                f"training kept exploding after {self.rollbacks} rollbacks (last at step {step}: {reason}); "
                f"lower training.lr (now x{self.lr_scale:g}) or tighten clipping")
        self.rollbacks += 1
        target = self.healthy_states[0]
        to_step = target["step"]
        self.model.load_state_dict(target["model"])  # copies into the parameters
        # load_state_dict adopts matching tensors as they are: copy, or later steps edit the target
        self.optimizer.load_state_dict(_cloned(target["optimizer"]))
        self.healthy_states.clear()
        self.healthy_states.append(target)  # newer states led here: only the restored one is trusted
        self.lr_scale *= stab.rollback_lr_factor
        self.health.alarm(step)
        self._event("rollback", f"rolled back to the state of step {to_step} after: {reason}",
                    {"to_step": to_step, "rollbacks": self.rollbacks}, step)
        self._event("lr_lowered", f"learning rate scaled to x{self.lr_scale:g}", {"lr_scale": self.lr_scale}, step)

    def _keep_healthy_state(self) -> None:
        """Remember a known-good state to roll back to (only under on_explosion: rollback).

        The state about to drop out of the two kept is overwritten in place when it has the same
        layout: copying into existing tensors spares an allocation of the model and optimizer
        state every HEALTHY_AFTER steps."""
        model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        oldest = self.healthy_states[0] if len(self.healthy_states) == self.healthy_states.maxlen else None
        if oldest is not None and _copy_into(oldest["model"], model) and _copy_into(oldest["optimizer"], optimizer):
            self.healthy_states.popleft()
            oldest["step"] = self.step
            self.healthy_states.append(oldest)
            return
        self.healthy_states.append({"step": self.step, "model": _cloned(model), "optimizer": _cloned(optimizer)})

    def _maybe_keep_healthy_state(self) -> None:
        """After enough calm steps, the current state becomes the rollback target."""
        if self.spec.stabilization.on_explosion != "rollback" or self.calm_steps < HEALTHY_AFTER:
            return
        if not self.healthy_states or self.step - self.healthy_states[-1]["step"] >= HEALTHY_AFTER:
            self._keep_healthy_state()

    def _record_row(self, row: dict[str, Any]) -> None:
        if self.health.observe(row["clipped"]) and self.spec.stabilization.clip.mode != "none":
            self._event("clip_burst", f"{self.health.clip_streak} consecutive steps clipped up to step {row['step']}",
                        {"grad_norm": row["grad_norm"]}, row["step"])
        row["health"] = self.health.state(row["step"])
        self.history.add_step(row)
        self.pending_rows.append(row)

    # ---- reporting ---------------------------------------------------------------------

    def flush(self) -> None:
        """Review every pending step and hand all rows and layer stats to the callbacks now."""
        self.sync(deliver=True)

    def _deliver(self) -> None:
        if self.pending_rows:
            rows, self.pending_rows = self.pending_rows, []
            self.cb.on_metrics(rows)
        for pending in self.pending_layers:
            rows = pending.rows(self.layer_names)
            self.history.add_layers(pending.step, rows)
            self.cb.on_layer_stats(pending.step, rows)
        self.pending_layers = []
        for acts in self.pending_activations:
            assert self.act_monitor is not None
            rows = self.act_monitor.rows(acts.stats, acts.grad_time, self.spec.training.seq_len)
            self.history.add_activations(acts.step, rows)
            self.cb.on_activation_stats(acts.step, rows)
        self.pending_activations = []
        self.last_flush = time.monotonic()
        # the final diagnosis comes with the result; rank 0 reports for all ranks
        if 0 < self.step < self.spec.training.max_steps and self.parallel.is_primary:
            self._live_diagnosis()

    def _event(self, kind: str, message: str, data: dict[str, Any], step: int | None = None) -> None:
        event = {"step": self.step if step is None else step, "kind": kind, "message": message, "data": data}
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
        mine = self.parallel.rows(t.batch_size)
        for _ in range(t.eval_batches):
            x, y = self.data.batch("val", t.batch_size, gen)
            x, y = x[mine].to(self.device), y[mine].to(self.device)
            with _autocast(self.device, self.spec.stabilization.precision):
                logits = self.model(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        self.model.train(was_training)
        return (self.parallel.average(total) / t.eval_batches).item()

    def diagnose(self) -> list[dict[str, Any]]:
        """Findings over the whole run so far."""
        return diagnose(self.history.step_rows(), self.history.layers, list(self.history.events),
                        spec_to_dict(self.spec), activations=self.history.activations)

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
                "guard": self.guard.state_dict(),
                "health": self.health.state_dict(),
                "consecutive_skips": self.consecutive_skips,
                "rollbacks": self.rollbacks,
                "calm_steps": self.calm_steps,
            },
            "val_loss": self.last_val_loss,
            "health": self._health(),
        }
        if self.parallel.world_size > 1:
            # each rank's dropout stream, so a resumed data-parallel run continues bit-identically
            state["rng"]["ranks"] = self.parallel.gather_objects(self._torch_rng())
        if self.healthy_states:
            state["healthy_states"] = list(self.healthy_states)
        return state

    def _torch_rng(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

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
        ranks = state["rng"].get("ranks") or []
        if len(ranks) == self.parallel.world_size > 1:
            torch.set_rng_state(ranks[self.parallel.rank]["torch"])
            if self.device.type == "cuda" and ranks[self.parallel.rank]["cuda"] is not None:
                torch.cuda.set_rng_state(ranks[self.parallel.rank]["cuda"], self.device)
        monitor = state["monitor"]
        self.history.load_state_dict(monitor["history"])
        self.history.truncate_after(self.step)
        self.clipper.load_state_dict(monitor["clipper"])
        self.guard.load_state_dict(monitor["guard"])
        self.health.load_state_dict(monitor["health"])
        self.consecutive_skips = monitor["consecutive_skips"]
        self.rollbacks = monitor["rollbacks"]
        self.calm_steps = monitor["calm_steps"]
        self.last_val_loss = state["val_loss"]
        self.healthy_states.extend(state.get("healthy_states", []))

    def save(self) -> dict[str, Any] | None:
        """Write a checkpoint of the current step; a storage failure is an event, not a crash."""
        self.flush()  # every row up to this step reaches the callbacks before the checkpoint
        state = self.state_dict()  # on every rank: it gathers the ranks' random states
        # rank 0 writes; another owner writing this folder now (lost lease) means touching nothing
        if not self.parallel.is_primary or not self.cb.may_write_checkpoints():
            return None
        path = checkpoint_path(self.out_dir, self.step)
        try:
            written = save_checkpoint(path, state)
        except (OSError, CheckpointError, RuntimeError) as exc:
            self._event("checkpoint_failed", f"checkpoint at step {self.step} not written: {exc}",
                        {"previous": self.last_checkpoint and self.last_checkpoint["step"]})
            return None
        info = {"step": self.step, "path": str(path), **written,
                "val_loss": self.last_val_loss, "health": self._health()}
        self.last_checkpoint = info
        self._event("checkpoint", f"checkpoint written at step {self.step}",
                    {"bytes": written["bytes"], "sha256": written["sha256"]})
        self.cb.on_checkpoint(info)
        self._prune_checkpoints()
        return info

    def _health(self) -> str:
        """The run's health: the worst severity among its latest findings (one health everywhere)."""
        return health_of(self.latest_findings or [])

    def _live_diagnosis(self) -> None:
        """Report the diagnosis so far, spending at most ~1% of the run's time on it."""
        if not self.diagnosis_budget.due():
            return
        self.diagnosis_budget.start()
        findings = self.latest_findings = self.diagnose()
        self.diagnosis_budget.stop()
        self.cb.on_diagnosis(findings, summarize(findings))

    def _prune_checkpoints(self) -> None:
        keep = self.spec.checkpointing.keep_last
        existing = sorted(self.out_dir.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        for old in existing[:-keep]:
            # Record first, file second: a listed checkpoint always has its file.
            self.cb.on_checkpoint_removed({"step": int(old.stem.split("_")[1]), "path": str(old)})
            old.unlink(missing_ok=True)

    # ---- endings -----------------------------------------------------------------------

    def _finish_succeeded(self) -> TrainResult:
        self.flush()
        # Diagnose before the final checkpoint, so its health is the final diagnosis' health.
        findings = self.latest_findings = self.diagnose()
        if self.parallel.from_primary(not self.last_checkpoint or self.last_checkpoint["step"] != self.step):
            self.save()
        self._event("finished", f"finished {self.step} steps; {summarize(findings).splitlines()[0]}",
                    {"val_loss": self.last_val_loss})
        return TrainResult("succeeded", self.step, None, findings, self.last_checkpoint)

    def _finish_cancelled(self) -> TrainResult:
        self.save()
        self.flush()
        self._event("cancelled", f"cancelled at step {self.step}", {})
        return TrainResult("cancelled", self.step, None, self.diagnose(), self.last_checkpoint)

    def _finish_paused(self) -> TrainResult:
        # paused before the first step: nothing to keep, a resumed run starts from the beginning. Rank 0
        # decides for all (save() is collective; only rank 0 knows the checkpoints it wrote).
        unsaved = bool(self.step) and (not self.last_checkpoint or self.last_checkpoint["step"] != self.step)
        if self.parallel.from_primary(unsaved):
            self.save()
        self.flush()
        self._event("paused", f"paused at step {self.step}", {})
        return TrainResult("paused", self.step, None, self.diagnose(), self.last_checkpoint)

    def _finish_failed(self, error: str) -> TrainResult:
        # No checkpoint of the broken state: the last healthy ones stay as they are.
        self.flush()
        findings = self.diagnose()
        self._event("failed", error, {})
        return TrainResult("failed", self.step, error, findings, self.last_checkpoint)
