"""Clipping modes, weight constraint and explosion detection, on hand-made gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from worker.engine.config import ClipConfig
from worker.engine.stabilizers import (
    GradClipper,
    SpikeGuard,
    adaptive_clip_unitwise,
    apply_weight_max_norm,
)


def _params(*grads: list[list[float]]) -> list[nn.Parameter]:
    params = []
    for g in grads:
        p = nn.Parameter(torch.ones(len(g), len(g[0])))
        p.grad = torch.tensor(g)
        params.append(p)
    return params


def _total(params) -> float:
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params))


def test_norm_clipping_scales_to_max_norm_and_reports_both_norms():
    params = _params([[3.0, 4.0]], [[0.0, 12.0]])  # total norm 13
    result = GradClipper(ClipConfig(mode="norm", max_norm=1.0), params, params).clip()
    assert result.pre_norm.item() == pytest.approx(13.0)
    assert result.post_norm.item() == pytest.approx(1.0, rel=1e-5)
    assert _total(params) == pytest.approx(1.0, rel=1e-5)


def test_norm_clipping_leaves_small_gradients_alone():
    params = _params([[0.3, 0.4]])
    result = GradClipper(ClipConfig(mode="norm", max_norm=1.0), params, params).clip()
    assert result.post_norm.item() == pytest.approx(0.5)
    assert params[0].grad[0].tolist() == pytest.approx([0.3, 0.4])


def test_value_clipping_clamps_each_element():
    params = _params([[3.0, -4.0, 0.5]])
    result = GradClipper(ClipConfig(mode="value", clip_value=1.0), params, params).clip()
    assert params[0].grad.tolist() == [[1.0, -1.0, 0.5]]
    assert result.pre_norm.item() == pytest.approx(math.sqrt(25.25))
    assert result.post_norm.item() == pytest.approx(math.sqrt(2.25))


def test_agc_caps_each_row_relative_to_its_weight_norm():
    p = nn.Parameter(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))  # row norms 5 and 0.5
    p.grad = torch.tensor([[1.0, 0.0], [0.001, 0.0]])
    adaptive_clip_unitwise([p], factor=0.01, eps=1e-3)
    assert p.grad[0].norm().item() == pytest.approx(0.05, rel=1e-4)  # capped at 0.01 * 5
    assert p.grad[1].tolist() == pytest.approx([0.001, 0.0])  # under 0.01 * 0.5: untouched


def test_adaptive_percentile_threshold_comes_from_the_run_history():
    params = _params([[1.0]])
    clipper = GradClipper(ClipConfig(mode="adaptive", adaptive_method="percentile", percentile=50.0,
                                     adaptive_warmup=3), params, params)
    for norm in (1.0, 2.0, 3.0):
        assert clipper.adaptive_threshold() is None  # warming up: no clipping yet
        clipper.observe(norm, norm)
    assert clipper.adaptive_threshold() == pytest.approx(2.0)
    params[0].grad = torch.tensor([[10.0]])
    result = clipper.clip()
    assert result.pre_norm.item() == pytest.approx(10.0)
    assert params[0].grad.item() == pytest.approx(2.0, rel=1e-5)


def test_adaptive_zscore_threshold_follows_ema_mean_and_std():
    params = _params([[1.0]])
    cfg = ClipConfig(mode="adaptive", adaptive_method="zscore", z_thresh=2.0, ema_alpha=0.5, adaptive_warmup=2)
    clipper = GradClipper(cfg, params, params)
    clipper.observe(1.0, 1.0)
    clipper.observe(3.0, 3.0)
    # mean 1 -> 2 ; var = 0.5 * (0 + 0.5 * 4) = 1
    assert clipper.ema_mean == pytest.approx(2.0)
    assert clipper.adaptive_threshold() == pytest.approx(2.0 + 2.0 * 1.0)
    clipper.observe(float("nan"), float("nan"))  # non-finite norms never enter the history
    assert clipper.seen == 2


def test_clipper_state_round_trips():
    params = _params([[1.0]])
    a = GradClipper(ClipConfig(mode="adaptive"), params, params)
    for n in (1.0, 5.0, 2.0):
        a.observe(n, n)
    b = GradClipper(ClipConfig(mode="adaptive"), params, params)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()


def test_weight_max_norm_renormalizes_rows_over_the_limit():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    apply_weight_max_norm([w], 1.0)
    assert w[0].norm().item() == pytest.approx(1.0, rel=1e-5)
    assert w[1].tolist() == pytest.approx([0.3, 0.4])


def _judge(guard, loss, norm):
    verdict, _, _ = guard.judge(torch.tensor(loss), torch.tensor(norm))
    return int(verdict)


def test_spike_guard_judges_on_the_device_against_the_recent_median():
    guard = SpikeGuard(grad_factor=10.0, detect_explosions=True, device=torch.device("cpu"))
    assert _judge(guard, 2.0, 100.0) == SpikeGuard.HEALTHY  # too little history to call it a spike
    for _ in range(SpikeGuard.MIN_HISTORY):
        guard.observe(torch.tensor(2.0), torch.tensor(1.0), torch.tensor(SpikeGuard.HEALTHY))
    assert _judge(guard, 2.0, 5.0) == SpikeGuard.HEALTHY
    assert _judge(guard, 2.0, 50.0) == SpikeGuard.EXPLOSION
    assert _judge(guard, 4.0, 1.0) == SpikeGuard.EXPLOSION  # loss 2x the median
    assert _judge(guard, float("nan"), 1.0) == SpikeGuard.NONFINITE
    assert _judge(guard, 2.0, float("inf")) == SpikeGuard.NONFINITE
    # A bad step never enters the history.
    guard.observe(torch.tensor(2.0), torch.tensor(1e6), torch.tensor(SpikeGuard.EXPLOSION))
    assert torch.nanmedian(guard.norms).item() == 1.0
    assert "50x" in guard.explain(SpikeGuard.EXPLOSION, 2.0, 50.0, 1.0, 2.0)
    assert "loss 4 jumped" in guard.explain(SpikeGuard.EXPLOSION, 4.0, 4.0, 1.0, 2.0)  # the rule that fired


def test_spike_guard_without_explosion_detection_only_flags_nonfinite():
    guard = SpikeGuard(grad_factor=10.0, detect_explosions=False, device=torch.device("cpu"))
    for _ in range(10):
        guard.observe(torch.tensor(2.0), torch.tensor(1.0), torch.tensor(SpikeGuard.HEALTHY))
    assert _judge(guard, 2.0, 1e6) == SpikeGuard.HEALTHY
    assert _judge(guard, float("inf"), 1.0) == SpikeGuard.NONFINITE


def test_noise_at_a_tiny_loss_is_not_a_spike():
    guard = SpikeGuard(grad_factor=10.0, detect_explosions=True, device=torch.device("cpu"))
    for _ in range(10):
        guard.observe(torch.tensor(0.03), torch.tensor(1.0), torch.tensor(SpikeGuard.HEALTHY))
    assert _judge(guard, 0.05, 1.0) == SpikeGuard.HEALTHY  # 1.7x, but 0.02 nats
    assert _judge(guard, 0.9, 1.0) == SpikeGuard.EXPLOSION


def test_percentile_history_stays_sorted_as_old_norms_leave_the_window():
    from worker.engine import stabilizers

    params = _params([[1.0]])
    clipper = GradClipper(ClipConfig(mode="adaptive", percentile=100.0, adaptive_warmup=1), params, params)
    clipper.history = stabilizers.deque(maxlen=3)
    for norm in (9.0, 1.0, 5.0, 2.0, 3.0):
        clipper.observe(norm, norm)
    assert list(clipper.history) == [5.0, 2.0, 3.0]
    assert clipper.sorted_history == [2.0, 3.0, 5.0]
    assert clipper.adaptive_threshold() == 5.0  # 9.0 left the window
