"""Training behaviour: explosion, vanishing, accumulation, resume, rollback, learning."""

from __future__ import annotations

import copy
import math
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch

from worker.engine import trainer as trainer_mod
from worker.engine.checkpoint import load_checkpoint
from worker.engine.trainer import Trainer, divergence_fixes, lr_at

from .spec_helpers import Recorder, corpus, spec


def _run(s, tmp_path: Path, text: str | None = None, **kw):
    rec = Recorder(**kw)
    tr = Trainer(s, text or corpus(), tmp_path / "ckpt", rec)
    return tr, rec, tr.run()


def _kinds(result) -> set[str]:
    return {f["kind"] for f in result.diagnosis}


def _mean_loss(rows, sl: slice) -> float:
    return statistics.mean(r["loss"] for r in rows[sl])


EXPLODING_RNN = {
    "model": {"arch": "rnn", "activation": "relu", "d_model": 32, "hidden": 64, "init": "normal", "init_std": 0.1},
    "training": {"max_steps": 60, "batch_size": 8, "seq_len": 32, "lr": 1.0, "optimizer": "sgd"},
    "stabilization": {"clip": {"mode": "none"}, "nonfinite": "stop"},
}


def test_exploding_rnn_without_clipping_diverges_and_is_flagged(tmp_path):
    s = spec(**EXPLODING_RNN)
    tr, rec, result = _run(s, tmp_path)
    assert result.status == "failed"
    assert result.step <= 30
    assert "non-finite" in result.error and "nonfinite" in result.error
    assert {"nonfinite", "exploding"} <= _kinds(result)
    exploding = next(f for f in result.diagnosis if f["kind"] == "exploding")
    fields = {r["field"] for r in exploding["recommendations"]}
    assert "stabilization.clip" in fields and "training.lr" in fields
    assert rec.rows[-1]["nonfinite"] and rec.kinds()[-1] == "failed"


def test_same_rnn_with_norm_clipping_stays_finite_and_learns(tmp_path):
    s = spec(**{**EXPLODING_RNN, "stabilization": {"clip": {"mode": "norm", "max_norm": 1.0}, "nonfinite": "stop"}})
    tr, rec, result = _run(s, tmp_path)
    assert result.status == "succeeded", result.error
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rec.rows)
    assert all(r["grad_norm_clipped"] <= 1.0 + 1e-4 for r in rec.rows)
    assert _mean_loss(rec.rows, slice(-10, None)) < _mean_loss(rec.rows, slice(0, 5)) - 1.5


def _deep_mlp(model: dict) -> dict:
    return {
        "model": {"arch": "mlp", "n_layers": 8, "d_model": 16, "hidden": 64, "context": 8, **model},
        "training": {"max_steps": 80, "batch_size": 16, "seq_len": 32, "lr": 3e-3, "optimizer": "adam"},
        "stabilization": {"clip": {"mode": "none"}},
    }


def test_deep_sigmoid_mlp_is_flagged_vanishing_in_early_layers(tmp_path):
    s = spec(**_deep_mlp({"activation": "sigmoid", "init": "normal", "init_std": 0.05}))
    _, _, result = _run(s, tmp_path)
    vanishing = next(f for f in result.diagnosis if f["kind"] == "vanishing")
    assert "layers.0.linear.weight" in vanishing["layers"]
    assert "layers.1.linear.weight" in vanishing["layers"]
    assert "head.weight" not in vanishing["layers"]
    medians = vanishing["evidence"]["median_grad_norm"]
    assert medians["layers.0.linear.weight"] < 1e-3 * medians["layers.7.linear.weight"]
    fields = {r["field"]: r["value"] for r in vanishing["recommendations"]}
    assert fields["model.activation"] == "relu" and fields["model.init"] == "kaiming_normal"


def test_relu_kaiming_batchnorm_mlp_is_healthy_and_learns_more(tmp_path):
    bad = spec(**_deep_mlp({"activation": "sigmoid", "init": "normal", "init_std": 0.05}))
    good = spec(**_deep_mlp({"activation": "relu", "init": "kaiming_normal", "norm": "batchnorm", "residual": True}))
    _, bad_rec, _ = _run(bad, tmp_path / "bad")
    _, good_rec, good_result = _run(good, tmp_path / "good")
    assert "vanishing" not in _kinds(good_result)
    assert _mean_loss(good_rec.rows, slice(-10, None)) < _mean_loss(bad_rec.rows, slice(-10, None)) - 0.5


class _FixedBatches:
    """Serves slices of one fixed batch, so accumulation can be compared exactly."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, micro: int) -> None:
        self.x, self.y, self.micro, self.i = x, y, micro, 0

    def batch_with_offsets(self, split, batch_size, generator):
        lo = self.i * self.micro
        self.i += 1
        return self.x[lo:lo + self.micro], self.y[lo:lo + self.micro], torch.arange(lo, lo + self.micro)


@pytest.mark.parametrize("arch", ["lstm", "transformer", "mlp"])
def test_four_micro_batches_of_8_equal_one_batch_of_32(tmp_path, arch):
    grads = []
    for batch, accum in [(32, 1), (8, 4)]:
        heads = {"n_heads": 2} if arch == "transformer" else {}  # n_heads is refused for other archs
        s = spec(model={"arch": arch, **heads, "norm": "layernorm" if arch != "mlp" else "none"},
                 training={"batch_size": batch, "grad_accum_steps": accum, "seed": 3})
        tr = Trainer(s, corpus(), tmp_path / f"{batch}")
        x, y = tr.data.batch("train", 32, torch.Generator().manual_seed(7))
        tr.data = _FixedBatches(x, y, batch)
        loss, *_ = tr._forward_backward(monitor_acts=False)
        grads.append((loss.item(), [p.grad.clone() for p in tr.params]))
    (loss_big, g_big), (loss_acc, g_acc) = grads
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    for a, b in zip(g_big, g_acc, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


RESUME_SPEC = {
    "model": {"arch": "lstm", "n_layers": 2, "dropout": 0.1, "norm": "layernorm", "residual": True},
    "training": {"max_steps": 12, "grad_accum_steps": 2, "optimizer": "adamw", "weight_decay": 0.01,
                 "schedule": "cosine", "warmup_steps": 3, "eval_every": 4},
    "stabilization": {"clip": {"mode": "adaptive", "adaptive_warmup": 3}, "on_explosion": "rollback"},
    "monitoring": {"layer_stats_every": 2},
}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_from_step_k_is_bit_identical_to_an_uninterrupted_run(tmp_path, precision):
    s = spec(**merge_stab(RESUME_SPEC, {"precision": precision}))
    straight = Trainer(s, corpus(), tmp_path / "a")
    assert straight.run().status == "succeeded"

    first = Trainer(s, corpus(), tmp_path / "b")
    for _ in range(5):
        first.train_step()
    info = first.save()
    del first
    resumed = Trainer(s, corpus(), tmp_path / "c", resume_from=Path(info["path"]))
    assert resumed.step == 5
    result = resumed.run()
    assert result.status == "succeeded" and result.step == 12
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for sa, sb in zip(straight.optimizer.state.values(), resumed.optimizer.state.values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert [r["step"] for r in resumed.history.step_rows()] == list(range(1, 13))
    assert resumed.health.state_dict() == straight.health.state_dict()


class PauseAtStep(Recorder):
    """Asks for a pause once `step` steps are done (should_pause is polled once before each step)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.pause_step, self.polls = step, 0

    def should_pause(self) -> bool:
        self.polls += 1
        return self.polls > self.pause_step


def _final_model(result) -> dict[str, torch.Tensor]:
    return load_checkpoint(Path(result.checkpoint["path"]))["model"]


@pytest.mark.parametrize("pause_step", [5, 7])
def test_pause_then_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, pause_step):
    # pause at 5 and 7: before and after the rollback spec's first healthy-state snapshot and evals
    s = spec(**RESUME_SPEC)
    straight = Trainer(s, corpus(), tmp_path / "straight").run()
    assert straight.status == "succeeded" and straight.step == 12

    pausing = PauseAtStep(pause_step)
    paused = Trainer(s, corpus(), tmp_path / "paused", pausing).run()
    assert paused.status == "paused" and paused.step == pause_step and paused.error is None
    assert paused.checkpoint["step"] == pause_step and Path(paused.checkpoint["path"]).is_file()
    assert [c["step"] for c in pausing.checkpoints] == [pause_step]
    assert pausing.kinds()[-1] == "paused"
    assert [r["step"] for r in pausing.rows] == list(range(1, pause_step + 1))  # every row reported first

    resumed = Trainer(s, corpus(), tmp_path / "paused", resume_from=Path(paused.checkpoint["path"])).run()
    assert resumed.status == "succeeded" and resumed.step == 12
    a, b = _final_model(straight), _final_model(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_pause_before_the_first_step_writes_no_checkpoint(tmp_path):
    pausing = PauseAtStep(0)
    result = Trainer(spec(), corpus(), tmp_path / "ckpt", pausing).run()
    assert result.status == "paused" and result.step == 0 and result.checkpoint is None
    assert not list((tmp_path / "ckpt").glob("step_*.pt")) and pausing.kinds() == ["started", "paused"]


def test_cancel_wins_over_a_pause_asked_at_the_same_step(tmp_path):
    class Both(PauseAtStep):
        def should_stop(self) -> bool:
            return self.polls >= 3

    result = Trainer(spec(), corpus(), tmp_path / "ckpt", Both(3)).run()
    assert result.status == "cancelled" and result.step == 3


def test_rollback_recovers_a_run_that_spikes(tmp_path):
    plain_spec = spec(**EXPLODING_RNN)
    guarded = spec(**merge_stab(EXPLODING_RNN, {"nonfinite": "skip", "on_explosion": "rollback",
                                                "rollback_lr_factor": 0.1, "explosion_factor": 20.0}))
    _, _, plain = _run(plain_spec, tmp_path / "plain")
    _, rec, result = _run(guarded, tmp_path / "guarded")
    assert plain.status == "failed"  # the unguarded run dies of its spike
    assert result.status == "succeeded", result.error
    assert result.step == 60
    kinds = rec.kinds()
    assert "rollback" in kinds and "lr_lowered" in kinds
    assert rec.rows[-1]["lr"] < 1.0 and not rec.rows[-1]["skipped"]
    assert all(math.isfinite(r["loss"]) for r in rec.rows[-10:])
    # Every spike was rolled back, never applied: the run keeps learning, if slowly at a lowered rate.
    assert max(r["loss"] for r in rec.rows if not r["skipped"]) < 6.0
    assert _mean_loss(rec.rows, slice(-10, None)) < _mean_loss(rec.rows, slice(0, 5)) - 0.2
    for rollback in (e for e in rec.events if e["kind"] == "rollback"):
        assert rollback["data"]["to_step"] < rollback["step"]


def merge_stab(base: dict, stab: dict) -> dict:
    return {**base, "stabilization": {**base["stabilization"], **stab}}


def test_nonfinite_skip_counts_and_fails_after_too_many_in_a_row(tmp_path):
    s = spec(**{**EXPLODING_RNN, "stabilization": {"clip": {"mode": "none"}, "nonfinite": "skip",
                                                   "max_consecutive_skips": 4}})
    _, rec, result = _run(s, tmp_path)
    assert result.status == "failed"
    assert "4 steps in a row skipped" in result.error
    assert result.error.endswith("the run is diverging: enable clipping (stabilization.clip) or lower training.lr")
    assert sum(r["skipped"] for r in rec.rows) >= 4
    assert Counter(rec.kinds())["step_skipped"] >= 4


def test_divergence_fixes_name_only_what_the_spec_lacks():
    clipped = {"clip": {"mode": "norm", "max_norm": 1.0}}
    assert divergence_fixes(spec(stabilization=clipped)) == "lower training.lr"
    assert divergence_fixes(spec(model={"arch": "transformer"}, stabilization={**clipped, "precision": "fp16"})) == (
        "lower training.lr or use bf16 (fp16 overflows at 65504)")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_measures_unscaled_gradients(tmp_path, precision):
    model = {"arch": "transformer", "d_model": 32, "n_heads": 2, "norm": "layernorm"}
    s32 = spec(model=model, training={"max_steps": 15})
    s = spec(model=model, training={"max_steps": 15}, stabilization={"precision": precision})
    _, rec32, _ = _run(s32, tmp_path / "fp32")
    _, rec, result = _run(s, tmp_path / precision)
    assert result.status == "succeeded"
    applied = [r for r in rec.rows if not r["skipped"]]
    assert len(applied) >= 10
    # Norms are measured after unscaling: same order of magnitude as fp32, not x65536.
    assert applied[0]["grad_norm"] == pytest.approx(rec32.rows[0]["grad_norm"], rel=0.2)
    if precision == "fp16":
        assert rec.rows[0]["loss_scale"] == 2.0**16
    assert _mean_loss(rec.rows, slice(-5, None)) < _mean_loss(rec.rows, slice(0, 3))


def test_fp16_recurrent_on_cpu_is_refused_with_a_fix(tmp_path):
    with pytest.raises(ValueError, match="use bf16 or fp32"):
        Trainer(spec(stabilization={"precision": "fp16"}), corpus(), tmp_path)


def test_rows_layer_stats_events_and_checkpoints_are_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "FLUSH_EVERY", 1)
    s = spec(training={"max_steps": 20, "eval_every": 10}, checkpointing={"every_steps": 5, "keep_last": 2})
    tr, rec, result = _run(s, tmp_path)
    assert [r["step"] for r in rec.rows] == list(range(1, 21))
    row = rec.rows[9]
    assert set(row) >= {"step", "loss", "lr", "grad_norm", "grad_norm_clipped", "clipped", "nonfinite",
                        "skipped", "loss_scale", "tokens_per_s", "tokens_seen", "val_loss", "time", "health"}
    assert row["val_loss"] is not None and rec.rows[8]["val_loss"] is None
    assert row["tokens_seen"] == 10 * 8 * 16
    assert sorted({r["step"] for r in rec.layers}) == [5, 10, 15, 20]
    layer_names = [r["layer"] for r in rec.layers if r["step"] == 5]
    assert layer_names == tr.layer_names
    assert all(r["update_ratio"] > 0 and r["weight_norm"] > 0 for r in rec.layers)
    assert [c["step"] for c in rec.checkpoints] == [5, 10, 15, 20]
    assert [c["step"] for c in rec.removed] == [5, 10]
    # live diagnosis at metric flushes while running (the final one comes with the result)
    live_steps = [step for step, _ in rec.diagnoses]
    assert live_steps and live_steps == sorted(set(live_steps)) and live_steps[-1] < 20
    assert all(summary.startswith(("healthy", "[")) for _, summary in rec.diagnoses)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_15.pt", "step_20.pt"]
    assert rec.kinds()[0] == "started" and rec.kinds()[-1] == "finished"
    state = load_checkpoint(tmp_path / "ckpt" / "step_20.pt")
    assert state["step"] == 20 and state["tokenizer"] == {"kind": "byte"}


def test_update_ratio_is_the_actual_parameter_change(tmp_path):
    s = spec(training={"max_steps": 5, "optimizer": "sgd", "lr": 0.1, "momentum": 0.0},
             stabilization={"clip": {"mode": "none"}}, monitoring={"layer_stats_every": 1})
    tr = Trainer(s, corpus(), tmp_path)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train_step()
    tr.flush()
    rows = {r["layer"]: r for r in tr.history.layers}
    for name in tr.layer_names:
        after = dict(tr.model.named_parameters())[name].detach()
        expected = (after - before[name]).norm() / after.norm()
        assert rows[name]["update_ratio"] == pytest.approx(expected.item(), rel=1e-4)


def test_cancel_stops_with_a_final_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "FLUSH_EVERY", 1)
    s = spec(training={"max_steps": 500})
    _, rec, result = _run(s, tmp_path, stop_at=7)
    assert result.status == "cancelled" and result.step == 7
    assert result.checkpoint["step"] == 7 and Path(result.checkpoint["path"]).exists()
    assert rec.kinds()[-1] == "cancelled"


def test_checkpoint_failure_is_an_event_and_training_continues(tmp_path):
    s = spec(training={"max_steps": 10}, checkpointing={"every_steps": 5})
    blocker = tmp_path / "ckpt"
    blocker.write_text("a file where the checkpoint folder should be")
    _, rec, result = _run(s, tmp_path)
    assert result.step == 10
    assert "checkpoint_failed" in rec.kinds()
    assert rec.checkpoints == []


def test_lr_schedule_is_a_pure_function_of_the_step():
    t = spec(training={"lr": 1.0, "max_steps": 110, "warmup_steps": 10, "schedule": "cosine",
                       "min_lr_ratio": 0.1}).training
    assert lr_at(5, t) == pytest.approx(0.5)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1)
    linear = spec(training={"lr": 1.0, "max_steps": 100, "schedule": "linear", "min_lr_ratio": 0.0}).training
    assert lr_at(50, linear) == pytest.approx(0.5)


def test_weight_max_norm_bounds_every_row(tmp_path):
    s = spec(training={"max_steps": 5, "lr": 0.5, "optimizer": "sgd"},
             stabilization={"weight_max_norm": 0.5, "clip": {"mode": "none"}})
    tr, _, result = _run(s, tmp_path)
    for w in tr.weights:
        assert w.detach().norm(dim=1).max().item() <= 0.5 + 1e-5


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_small_real_text_gets_well_below_unigram_entropy(tmp_path, arch):
    text = corpus(None)
    counts = Counter(text.encode("utf-8"))
    total = sum(counts.values())
    unigram_bits = -sum(c / total * math.log2(c / total) for c in counts.values())
    model = ({"arch": "lstm", "n_layers": 1, "d_model": 48, "hidden": 128} if arch == "lstm" else
             {"arch": "transformer", "n_layers": 2, "d_model": 64, "n_heads": 4, "norm": "layernorm",
              "init": "normal", "init_std": 0.02})
    s = spec(model=model, training={"max_steps": 250, "batch_size": 16, "seq_len": 64, "lr": 3e-3,
                                    "schedule": "cosine", "warmup_steps": 20, "eval_every": 250})
    _, rec, result = _run(s, tmp_path, text=text)
    assert result.status == "succeeded"
    val_bits = rec.rows[-1]["val_loss"] / math.log(2)
    assert val_bits < 0.6 * unigram_bits, (val_bits, unigram_bits)


@pytest.mark.parametrize("model, tokenizer", [
    ({"arch": "rnn", "activation": "tanh", "norm": "rmsnorm"}, "char"),
    ({"arch": "gru", "n_layers": 2, "residual": True, "recurrent_init": "orthogonal"}, "byte"),
    ({"arch": "lstm", "forget_bias": 1.0, "init": "xavier_uniform"}, "char"),
    ({"arch": "mlp", "n_layers": 3, "activation": "gelu", "norm": "layernorm", "tie_embeddings": False}, "byte"),
    ({"arch": "transformer", "d_model": 32, "n_heads": 2, "norm": "rmsnorm", "norm_position": "post",
      "qk_norm": True, "tie_embeddings": True, "dropout": 0.1}, "char"),
])
def test_every_architecture_trains_checkpoints_and_samples(tmp_path, model, tokenizer):
    from worker.engine.sampling import sample_from_checkpoint

    s = spec(model=model, tokenizer={"kind": tokenizer}, training={"max_steps": 6},
             stabilization={"clip": {"mode": "agc"}})
    _, rec, result = _run(s, tmp_path)
    assert result.status == "succeeded" and all(math.isfinite(r["loss"]) for r in rec.rows)
    text = sample_from_checkpoint(Path(result.checkpoint["path"]), "The ", max_new_tokens=20, seed=0)
    assert isinstance(text, str) and len(text) > 0
    state = load_checkpoint(Path(result.checkpoint["path"]))
    assert state["tokenizer"]["kind"] == tokenizer


def test_deferred_host_reads_give_the_same_run_as_per_step_reads(tmp_path):
    """The GPU mode (host reads every k steps) changes when the host looks, not what is trained."""
    s = spec(training={"max_steps": 12, "eval_every": 6}, stabilization={"on_explosion": "skip"})
    eager = Trainer(s, corpus(), tmp_path / "eager", sync_every=1)
    deferred_rec = Recorder()
    deferred = Trainer(s, corpus(), tmp_path / "deferred", deferred_rec, sync_every=5)
    assert eager.run().status == deferred.run().status == "succeeded"
    for a, b in zip(eager.model.parameters(), deferred.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert [r["step"] for r in deferred_rec.rows] == list(range(1, 13))
    assert [r["loss"] for r in deferred_rec.rows] == [r["loss"] for r in eager.history.step_rows()]


def test_a_bad_step_is_skipped_on_the_device_without_touching_weights(tmp_path):
    s = spec(**{**EXPLODING_RNN, "stabilization": {"clip": {"mode": "none"}, "nonfinite": "skip",
                                                   "max_consecutive_skips": 50}})
    rec = Recorder()
    tr = Trainer(s, corpus(), tmp_path, rec, sync_every=8)
    weights_before_bad = None
    while tr.step < 40:
        before = [p.detach().clone() for p in tr.params]
        tr.train_step()
        tr.flush()
        if rec.rows[-1]["skipped"]:
            weights_before_bad = before
            break
    assert weights_before_bad is not None, "the run never produced a bad step"
    assert rec.rows[-1]["nonfinite"]
    for old, p in zip(weights_before_bad, tr.params, strict=True):
        assert torch.equal(old, p.detach())
    assert "nonfinite" in rec.kinds() and "step_skipped" in rec.kinds()


def test_a_rollback_target_is_not_changed_by_the_steps_after_it(tmp_path):
    s = spec(training={"optimizer": "adamw"}, stabilization={"on_explosion": "rollback"})
    tr = Trainer(s, corpus(), tmp_path)
    for _ in range(2):
        tr.train_step()
    tr._keep_healthy_state()
    saved = copy.deepcopy(tr.healthy_states[-1]["optimizer"])
    for attempt in range(2):
        for _ in range(3):
            tr.train_step()
        tr._rollback(tr.step, f"test rollback {attempt}")
        target = tr.healthy_states[0]["optimizer"]["state"]
        for key, state in saved["state"].items():
            for name, value in state.items():
                assert torch.equal(target[key][name], value), (attempt, key, name)


class _NoFiles(Recorder):
    def may_write_checkpoints(self) -> bool:
        return False


def test_a_run_that_lost_its_checkpoint_folder_writes_and_prunes_nothing(tmp_path):
    s = spec(training={"max_steps": 10}, checkpointing={"every_steps": 2, "keep_last": 1})
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "step_1.pt").write_bytes(b"the new owner's checkpoint")
    result = Trainer(s, corpus(), folder, _NoFiles()).run()
    assert result.step == 10 and result.checkpoint is None
    assert [p.name for p in folder.iterdir()] == ["step_1.pt"]


def test_healthy_states_are_copies_reused_in_place(tmp_path):
    s = spec(stabilization={"on_explosion": "rollback"}, training={"max_steps": 40})
    tr = Trainer(s, corpus(), tmp_path / "ckpt")
    tr.run()
    assert len(tr.healthy_states) == 2
    kept = tr.healthy_states[-1]
    weight = kept["model"]["head.weight"]
    before = weight.clone()
    tr._keep_healthy_state()  # the oldest entry is overwritten in place and becomes the newest
    newest = tr.healthy_states[-1]
    assert newest["step"] == tr.step and tr.healthy_states[0] is kept
    assert torch.equal(kept["model"]["head.weight"], before)  # the other state is untouched
    assert torch.equal(newest["model"]["head.weight"], tr.model.state_dict()["head.weight"])
    assert newest["model"]["head.weight"].data_ptr() != tr.model.head.weight.data_ptr()
    with torch.no_grad():
        tr.model.head.weight.add_(1.0)  # training on does not edit the kept copy
    assert not torch.equal(newest["model"]["head.weight"], tr.model.head.weight)
    exp_avg = next(iter(newest["optimizer"]["state"].values()))["exp_avg"]
    assert all(exp_avg.data_ptr() != st["exp_avg"].data_ptr() for st in tr.optimizer.state.values())
