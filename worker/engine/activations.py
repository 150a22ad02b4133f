"""Activation statistics and gradients through time, measured with hooks.

Every `monitoring.layer_stats_every` steps the trainer runs its forward pass
inside `ActivationMonitor.capture()`: forward hooks on each activation site
(activation modules, attention, recurrent layers, the output head) reduce the
site's output to a few numbers *on the device*. Nothing is read back here; the
trainer moves the stacked tensor to the host at its next flush, with the layer
statistics. The hooks exist only during that one forward pass, so the other
steps pay nothing.

For rnn/gru/lstm, `grad_through_time` measures how much the loss at the last
position of a window still depends on earlier positions: the norm of
dL_last/dx_t at each recurrent layer's input x (for layer l > 0 that is the
hidden state of layer l-1). torch's recurrent kernels keep h_t -> h_{t+1}
internal, so the gradient of the layer's *output* would only show the paths
through the layers above; the gradient of its *input* at t flows through the
whole recurrence from t to the end. Vanishing through time shows as a tiny
norm at t = 0 compared with t = T-1.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Saturation: where tanh/sigmoid derivatives are below ~0.06, the unit passes almost no gradient.
TANH_SATURATED = 0.97
SIGMOID_SATURATED = 0.03  # a < 0.03 or a > 0.97
# A ReLU-family unit is dead when its pre-activation stays below this for the whole batch
# (0 for relu/leaky_relu/elu, whose slope there is 0, 0.01 or e^x; gelu/silu still pass
# gradient just below 0, so only a pre-activation under -3 counts for them).
DEAD_BELOW = {"relu": 0.0, "leaky_relu": 0.0, "elu": 0.0, "gelu": -3.0, "silu": -3.0}
# Rows of the batch the through-time probe back-propagates. One row's norms already tell orders of
# magnitude apart, and on a CPU a recurrent pass costs nearly as much for 4 rows as for 16 (11 ms for
# 1 row, 20 ms for 4 on the bench's 2-layer LSTM): the probe is the costliest part of monitoring.
PROBE_ROWS = 1
# Rows of the batch the moments, saturated fractions, attention logits and z are estimated from (a
# few hundred thousand values): over all 16 rows of the bench's transformer they cost 23 ms a step.
# Dead units are judged on the whole batch ("never fires" needs every row).
STAT_ROWS = 4

_ACTIVATION_KINDS: dict[type[nn.Module], str] = {
    nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu",
    nn.GELU: "gelu", nn.SiLU: "silu", nn.ELU: "elu",
}
# Columns of the per-site statistics tensor, in order (NaN where a column does not apply).
STAT_KEYS = ("mean", "std", "saturated_frac", "dead_frac", "attn_max_logit", "attn_entropy", "z_lse")
ROW_KEYS = (*STAT_KEYS, "grad_time", "grad_time_ratio")


@dataclass
class Site:
    name: str
    kind: str
    module: nn.Module


def find_sites(model: nn.Module) -> list[Site]:
    """Activation sites in registration order, which the models keep equal to depth order."""
    sites = []
    for name, module in model.named_modules():
        kind = _ACTIVATION_KINDS.get(type(module))
        if kind is not None:
            sites.append(Site(name, kind, module))
        elif isinstance(module, nn.RNNBase):
            sites.append(Site(name, "recurrent", module))
        elif hasattr(module, "q_norm") and hasattr(module, "k_norm"):
            sites.append(Site(name, "attention", module))
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        sites.append(Site("head", "output", head))
    return sites


def _nan(device: torch.device) -> torch.Tensor:
    return torch.full((), math.nan, device=device)


def _moments(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    std, mean = torch.std_mean(a[:STAT_ROWS].detach().float(), correction=0)
    return mean, std


def _saturated(kind: str, a: torch.Tensor) -> torch.Tensor:
    a = a[:STAT_ROWS].detach()
    if kind == "tanh":
        return (a.abs() > TANH_SATURATED).float().mean()
    return ((a < SIGMOID_SATURATED) | (a > 1 - SIGMOID_SATURATED)).float().mean()


def _dead(pre: torch.Tensor, below: float) -> torch.Tensor:
    """Fraction of units (last dim) whose pre-activation is under `below` everywhere in the batch."""
    units = pre.detach().reshape(-1, pre.shape[-1])
    return (units.amax(dim=0) <= below).float().mean()


def _activation_stats(kind: str, pre: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
    mean, std = _moments(out)
    nan = _nan(out.device)
    saturated = _saturated(kind, out) if kind in ("tanh", "sigmoid") else nan
    dead = _dead(pre, DEAD_BELOW[kind]) if kind in DEAD_BELOW else nan
    return [mean, std, saturated, dead, nan, nan, nan]


def _recurrent_stats(module: nn.RNNBase, out: torch.Tensor) -> list[torch.Tensor]:
    mean, std = _moments(out)
    nan = _nan(out.device)
    saturated = dead = nan
    if isinstance(module, nn.RNN):  # a vanilla RNN's output is its activation; gated cells mix theirs
        if module.nonlinearity == "tanh":
            saturated = _saturated("tanh", out)
        else:
            dead = _dead(out, 0.0)
    return [mean, std, saturated, dead, nan, nan, nan]


def _attention_stats(q: torch.Tensor, k: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
    """Max causal attention logit and mean attention entropy, from q, k of shape [B, T, H, hd]
    (over the first STAT_ROWS rows of the batch)."""
    q = q[:STAT_ROWS].detach().float().transpose(1, 2)  # [rows, H, T, hd]
    k = k[:STAT_ROWS].detach().float().transpose(1, 2)
    T = q.shape[-2]
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    logits = logits.masked_fill(~causal, -math.inf)
    probs = logits.softmax(dim=-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1).mean()
    mean, std = _moments(out)
    nan = _nan(out.device)
    return [mean, std, nan, nan, logits.amax(), entropy, nan]


def _output_stats(logits: torch.Tensor) -> list[torch.Tensor]:
    mean, std = _moments(logits)
    nan = _nan(logits.device)
    z = torch.logsumexp(logits[:STAT_ROWS].detach().float(), dim=-1).mean()
    return [mean, std, nan, nan, nan, nan, z]


class ActivationMonitor:
    """Statistics of every activation site during one forward pass, kept on the device."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sites = find_sites(model)
        self.recurrent = [s for s in self.sites if s.kind == "recurrent"]
        self._stats: dict[str, list[torch.Tensor]] = {}

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.sites]

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Hooks on every site for the forward passes inside the block."""
        self._stats = {}
        handles = []
        for site in self.sites:
            handles.extend(self._hook(site))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, site: Site) -> list[Any]:
        name, kind, module = site.name, site.kind, site.module
        if kind == "attention":
            qk: dict[str, torch.Tensor] = {}
            return [
                module.q_norm.register_forward_hook(lambda _m, _i, out: qk.__setitem__("q", out)),
                module.k_norm.register_forward_hook(lambda _m, _i, out: qk.__setitem__("k", out)),
                module.register_forward_hook(
                    lambda _m, _i, out: self._keep(name, lambda: _attention_stats(qk["q"], qk["k"], out))),
            ]
        if kind == "recurrent":
            return [module.register_forward_hook(
                lambda m, _i, out: self._keep(name, lambda: _recurrent_stats(m, out[0])))]
        if kind == "output":
            return [module.register_forward_hook(lambda _m, _i, out: self._keep(name, lambda: _output_stats(out)))]
        return [module.register_forward_hook(
            lambda _m, inputs, out: self._keep(name, lambda: _activation_stats(kind, inputs[0], out)))]

    def _keep(self, name: str, stats: Any) -> None:
        # Only the first pass counts (the first micro-batch under gradient accumulation).
        if name not in self._stats:
            with torch.no_grad():
                self._stats[name] = stats()

    def collected(self) -> torch.Tensor | None:
        """[n_sites, len(STAT_KEYS)] device tensor of the last capture (None if nothing ran)."""
        if not self._stats:
            return None
        device = next(iter(self._stats.values()))[0].device
        missing = [_nan(device)] * len(STAT_KEYS)
        return torch.stack([torch.stack(self._stats.get(s.name, missing)) for s in self.sites])

    def grad_through_time(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """||dL_last/dx_t|| at each recurrent layer's input for t at the probe positions.

        [n_recurrent, len(probe_positions)] device tensor; None without recurrent layers.
        Runs in eval mode (no dropout, no RNG drawn) and leaves the weights' .grad alone.
        """
        if not self.recurrent:
            return None
        x, y = x[:PROBE_ROWS], y[:PROBE_ROWS]
        inputs: list[torch.Tensor] = []
        handles = [s.module.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
                   for s in self.recurrent]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                logits = self.model(x)
                loss = F.cross_entropy(logits[:, -1].float(), y[:, -1])
                grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)
        positions = probe_positions(x.shape[1])
        return torch.stack([
            torch.zeros(len(positions), device=x.device) if g is None
            else torch.linalg.vector_norm(g[:, positions].float(), dim=(0, 2))
            for g in grads
        ])

    def rows(self, stats: torch.Tensor | None, grad_time: torch.Tensor | None, seq_len: int) -> list[dict[str, Any]]:
        """Host rows in depth order (one read of each device tensor)."""
        values = stats.cpu().tolist() if stats is not None else [[math.nan] * len(STAT_KEYS)] * len(self.sites)
        through_time = grad_time.cpu().tolist() if grad_time is not None else []
        positions = probe_positions(seq_len)
        by_site = {s.name: norms for s, norms in zip(self.recurrent, through_time, strict=False)}
        rows = []
        for site, vals in zip(self.sites, values, strict=True):
            row: dict[str, Any] = {"site": site.name, "kind": site.kind, **dict(zip(STAT_KEYS, vals, strict=True))}
            norms = by_site.get(site.name)
            row["grad_time"] = [[t, n] for t, n in zip(positions, norms, strict=True)] if norms else None
            row["grad_time_ratio"] = norms[0] / norms[-1] if norms and norms[-1] > 0 else None
            rows.append(row)
        return rows


def probe_positions(seq_len: int) -> list[int]:
    """t = 0, T/4, T/2, 3T/4, T-1 (distinct, ascending)."""
    return sorted({0, seq_len // 4, seq_len // 2, (3 * seq_len) // 4, seq_len - 1})


@dataclass
class PendingActivationStats:
    """One step's activation statistics, still on the device."""

    step: int
    stats: torch.Tensor | None
    grad_time: torch.Tensor | None
