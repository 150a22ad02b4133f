"""Gradient clipping, explosion detection and weight constraints.

Clipping works on gradients that are already unscaled (fp16) and summed over
the whole accumulation window, once per optimizer step. Norms stay on the
device: nothing here reads a value back to the host.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm

from .config import ClipConfig

# How many past grad norms the adaptive clipper remembers.
HISTORY = 1000


@dataclass
class ClipResult:
    """Global grad norm before and after clipping, as 0-d device tensors."""

    pre_norm: torch.Tensor
    post_norm: torch.Tensor


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


class GradClipper:
    """Applies the configured clipping mode and reports norms before and after."""

    def __init__(self, cfg: ClipConfig, params: list[nn.Parameter], agc_params: list[nn.Parameter]):
        self.cfg = cfg
        self.params = params
        self.agc_params = agc_params
        self.history: deque[float] = deque(maxlen=HISTORY)
        self.sorted_history: list[float] = []  # the same values kept sorted: a percentile is an index
        self.ema_mean: float | None = None
        self.ema_var = 0.0
        self.seen = 0

    def clip(self) -> ClipResult:
        """Clip the gradients in place; return the norms."""
        mode = self.cfg.mode
        norm_type = self.cfg.norm_type
        if mode == "norm":
            pre = clip_grad_norm_(self.params, self.cfg.max_norm, norm_type, foreach=None)
            return ClipResult(pre, _clipped_norm(pre, self.cfg.max_norm))
        pre = get_total_norm(_grads(self.params), norm_type)
        if mode == "none":
            return ClipResult(pre, pre)
        if mode == "value":
            clip_grad_value_(self.params, self.cfg.clip_value)
            return ClipResult(pre, get_total_norm(_grads(self.params), norm_type))
        if mode == "agc":
            adaptive_clip_unitwise(self.agc_params, self.cfg.agc_factor, self.cfg.agc_eps)
            return ClipResult(pre, get_total_norm(_grads(self.params), norm_type))
        threshold = self.adaptive_threshold()
        if threshold is None:
            return ClipResult(pre, pre)
        clip_grads_with_norm_(self.params, threshold, pre)
        return ClipResult(pre, _clipped_norm(pre, threshold))

    def adaptive_threshold(self) -> float | None:
        """Threshold learned from this run's own history; None while warming up."""
        if self.seen < self.cfg.adaptive_warmup:
            return None
        if self.cfg.adaptive_method == "percentile":
            # AutoClip (Seetharaman et al. 2020): p-th percentile of past norms.
            return _percentile(self.sorted_history, self.cfg.percentile)
        # ZClip: EMA mean + z * EMA std of the (clipped) norms.
        assert self.ema_mean is not None
        return self.ema_mean + self.cfg.z_thresh * math.sqrt(self.ema_var)

    def observe(self, pre_norm: float, post_norm: float) -> None:
        """Record a finite step's norms (host floats) for the adaptive threshold."""
        if not (math.isfinite(pre_norm) and math.isfinite(post_norm)):
            return
        self.seen += 1
        if len(self.history) == self.history.maxlen:
            del self.sorted_history[bisect.bisect_left(self.sorted_history, self.history[0])]
        self.history.append(pre_norm)
        bisect.insort(self.sorted_history, pre_norm)
        alpha = self.cfg.ema_alpha
        if self.ema_mean is None:
            self.ema_mean = post_norm
            return
        delta = post_norm - self.ema_mean
        self.ema_mean += (1 - alpha) * delta
        self.ema_var = alpha * (self.ema_var + (1 - alpha) * delta * delta)

    def state_dict(self) -> dict:
        return {
            "history": list(self.history),
            "ema_mean": self.ema_mean,
            "ema_var": self.ema_var,
            "seen": self.seen,
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=HISTORY)
        self.sorted_history = sorted(self.history)
        self.ema_mean = state["ema_mean"]
        self.ema_var = state["ema_var"]
        self.seen = state["seen"]


def _clipped_norm(pre: torch.Tensor, max_norm: float) -> torch.Tensor:
    # The same coefficient torch's clipping applies, so no second norm pass is needed.
    return pre * torch.clamp(max_norm / (pre + 1e-6), max=1.0)


def _percentile(ordered: list[float], pct: float) -> float:
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@torch.no_grad()
def adaptive_clip_unitwise(params: list[nn.Parameter], factor: float, eps: float) -> None:
    """AGC (Brock et al. 2021): cap each row's grad norm at factor x its weight norm.

    torch has no AGC; timm's reference does the same per unit, this is the
    same rule over rows (output units) of every weight matrix.
    """
    for p in params:
        if p.grad is None:
            continue
        dims = tuple(range(1, p.ndim))
        w_norm = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True).clamp_min(eps)
        g_norm = torch.linalg.vector_norm(p.grad, dim=dims, keepdim=True)
        max_norm = w_norm * factor
        scale = torch.where(g_norm > max_norm, max_norm / g_norm.clamp_min(1e-6), 1.0)
        p.grad.mul_(scale)


@torch.no_grad()
def apply_weight_max_norm(weights: list[torch.Tensor], max_norm: float) -> None:
    """Max-norm constraint: rescale each row of each weight matrix to norm <= max_norm."""
    for w in weights:
        torch.renorm(w, p=2, dim=0, maxnorm=max_norm, out=w)


class SpikeGuard:
    """Judges each step on the device: 0 healthy, 1 non-finite, 2 explosion.

    An explosion is a grad norm `grad_factor` times, or a loss LOSS_FACTOR
    times, the median of the last WINDOW healthy steps. The history lives in
    NaN-padded device buffers (nanmedian skips the padding), so judging a
    step never waits for the host.
    """

    WINDOW = 50
    MIN_HISTORY = 5
    LOSS_FACTOR = 1.5
    LOSS_JUMP = 0.5  # nats
    HEALTHY, NONFINITE, EXPLOSION = 0, 1, 2

    def __init__(self, grad_factor: float, detect_explosions: bool, device: torch.device) -> None:
        self.grad_factor = grad_factor
        self.detect_explosions = detect_explosions
        self.norms = torch.full((self.WINDOW,), math.nan, device=device)
        self.losses = torch.full((self.WINDOW,), math.nan, device=device)
        self.position = 0

    @torch.no_grad()
    def judge(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(verdict, median grad norm, median loss) of this step, as device tensors."""
        loss, grad_norm = loss.float(), grad_norm.float()
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        norm_median = torch.nanmedian(self.norms)
        loss_median = torch.nanmedian(self.losses)
        verdict = torch.where(finite, self.HEALTHY, self.NONFINITE)
        if self.detect_explosions:
            enough = (~torch.isnan(self.norms)).sum() >= self.MIN_HISTORY
            spike = (grad_norm > self.grad_factor * norm_median) | self.loss_jumped(loss, loss_median)
            verdict = torch.where(finite & enough & spike, self.EXPLOSION, verdict)
        return verdict, norm_median, loss_median

    @torch.no_grad()
    def observe(self, loss: torch.Tensor, grad_norm: torch.Tensor, verdict: torch.Tensor) -> None:
        """Remember the step in the history when it was healthy (on the device)."""
        slot = self.position % self.WINDOW
        healthy = verdict == self.HEALTHY
        self.norms[slot] = torch.where(healthy, grad_norm.float(), self.norms[slot])
        self.losses[slot] = torch.where(healthy, loss.float(), self.losses[slot])
        self.position += 1

    @classmethod
    def loss_jumped(cls, loss: Any, median: Any) -> Any:
        """A loss spike: LOSS_FACTOR times the median AND at least LOSS_JUMP nats above it.

        The absolute part keeps ordinary noise at a tiny loss (0.05 against a median of
        0.03) from counting as a spike. Works on tensors and on floats.
        """
        return (loss > cls.LOSS_FACTOR * median) & (loss - median > cls.LOSS_JUMP)

    def explain(self, verdict: int, loss: float, grad_norm: float, norm_median: float, loss_median: float) -> str:
        """The verdict in words (the rule that fired), for events and errors."""
        if verdict == SpikeGuard.NONFINITE:
            return f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}"
        if self.grad_norm_jumped(grad_norm, norm_median):
            return (f"grad norm {grad_norm:.3g} is {grad_norm / norm_median:.0f}x "
                    f"the recent median {norm_median:.3g}")
        return f"loss {loss:.4g} jumped above {self.LOSS_FACTOR}x the recent median {loss_median:.4g}"

    def grad_norm_jumped(self, grad_norm: float, norm_median: float) -> bool:
        """The grad-norm rule (host floats): the norm is grad_factor times the recent median."""
        return grad_norm > self.grad_factor * norm_median

    def state_dict(self) -> dict:
        return {"norms": self.norms.cpu(), "losses": self.losses.cpu(), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.norms.copy_(state["norms"])
        self.losses.copy_(state["losses"])
        self.position = state["position"]
