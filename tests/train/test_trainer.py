"""Trainer: determinism, learning MQAR, early stop, checkpoints, LR schedule, clipping, batching."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from trainhelp import StepRecorder, copy_prev, tiny_model

from memlab import tasks
from memlab.models.lm import LM
from memlab.train import (
    TrainConfig,
    evaluate,
    load_checkpoint,
    lr_at,
    save_checkpoint,
    seed_everything,
    train,
)


def test_same_seed_same_loss_curve_bitwise() -> None:
    data = [copy_prev(96, 12, 0), copy_prev(64, 20, 1)]
    cfg = TrainConfig(lr=3e-3, epochs=2, batch_size=16, progress=False, seed=5)
    a = train(tiny_model(), data, {}, cfg, "cpu")
    b = train(tiny_model(), data, {}, cfg, "cpu")
    assert a.losses == b.losses  # float equality: bit for bit
    assert len(a.losses) == a.steps == 2 * (6 + 4)
    cfg6 = TrainConfig(lr=3e-3, epochs=2, batch_size=16, progress=False, seed=6)
    c = train(tiny_model(), data, {}, cfg6, "cpu")
    assert c.losses != a.losses


def test_attention_learns_tiny_mqar() -> None:
    task = tasks.build("mqar", vocab_size=32, seq_len=16, num_pairs=4)
    train_set, test_set = task.make(6400, seed=0), task.make(300, seed=1)
    seed_everything(0)
    model = LM.from_mixer("attention", vocab_size=32, d_model=64, n_layers=2)
    # Token embeddings on the scale of the mixer outputs: at std 0.02 the token's identity is
    # drowned in the residual stream after layer 1 and the induction circuit takes thousands of
    # steps to form instead of about a hundred.
    nn.init.normal_(model.embed.weight, std=0.3)
    before = evaluate(model, test_set, batch_size=100, device="cpu")
    cfg = TrainConfig(lr=3e-3, epochs=6, batch_size=64, progress=False, target_accuracy=0.95)
    result = train(model, [train_set], {"test": test_set}, cfg, "cpu")
    # Chance for a model that knows which values are in context but not which key they belong
    # to is 1 / num_pairs = 0.25; recall must beat it by far.
    assert before < 0.1
    assert result.best_accuracy["test"] > 0.9, result.best_accuracy
    assert result.eval_accuracy["test"] == evaluate(model, test_set, batch_size=64, device="cpu")


def test_evaluate_pools_positions_over_batches() -> None:
    model = tiny_model()
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=16, progress=False)
    train(model, [copy_prev(64, 9, 0)], {}, cfg, "cpu")
    model.eval()
    data = copy_prev(37, 9, 3)
    data.targets[::3, 2:] = -100  # uneven labelled counts per example
    with torch.no_grad():
        whole = tasks.accuracy(model(data.inputs)[0], data.targets)
    assert 0.05 < whole < 0.95  # some right, some wrong: pooling errors would show
    for batch_size in (1, 5, 64):
        assert evaluate(model, data, batch_size=batch_size, device="cpu") == pytest.approx(whole, abs=1e-12)
    model.train()
    evaluate(model, data, batch_size=8, device="cpu")
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, data, batch_size=0, device="cpu")


def test_early_stop_at_target_accuracy() -> None:
    data, test = copy_prev(256, 16, 0), copy_prev(64, 16, 1)
    cfg = TrainConfig(lr=1e-2, epochs=40, batch_size=16, progress=False, target_accuracy=0.9)
    result = train(tiny_model(), [data], {"a": test, "b": test.subset(32)}, cfg, "cpu")
    assert result.stopped_early
    assert result.epochs_run < 40
    assert min(result.eval_accuracy.values()) >= 0.9
    assert result.steps == len(result.losses) == result.epochs_run * 16
    assert result.train_tokens == result.steps * 16 * 16
    for name, acc in result.eval_accuracy.items():
        assert result.best_accuracy[name] >= acc
    assert result.tokens_per_s > 0 and result.peak_memory_bytes > 0
    assert result.wall_s >= result.train_tokens / result.tokens_per_s
    # One history entry per epoch: its step count, the mean of its losses, its evaluation.
    hist = result.epoch_history
    assert [h["epoch"] for h in hist] == list(range(1, result.epochs_run + 1))
    assert [h["steps"] for h in hist] == [16 * (i + 1) for i in range(result.epochs_run)]
    for i, h in enumerate(hist):
        assert h["mean_loss"] == pytest.approx(sum(result.losses[16 * i:16 * (i + 1)]) / 16, rel=1e-5)
    assert hist[-1]["accuracy"] == result.eval_accuracy
    assert max(h["accuracy"]["a"] for h in hist) == result.best_accuracy["a"]


def test_time_cap_stops_evaluates_and_anneals(recorder: StepRecorder, monkeypatch) -> None:
    # A fake clock that advances 1 s per reading makes the cap hit at a known step.
    clock = iter(range(10**6))
    monkeypatch.setattr("memlab.train.trainer.time.perf_counter", lambda: float(next(clock)))
    data, test = copy_prev(160, 8, 0), copy_prev(32, 8, 1)
    cfg = TrainConfig(lr=0.02, epochs=50, batch_size=16, max_train_s=12.0, progress=False)
    result = train(tiny_model(), [data], {"t": test}, cfg, "cpu")
    assert result.stopped_by_time and not result.stopped_early
    assert 0 < result.steps < 50 * 10 and result.epochs_run == 1
    assert result.steps == len(result.losses) == len(recorder.lrs)
    assert "t" in result.eval_accuracy
    # The schedule follows the time cap, not the 500 planned steps: the last lr is already far
    # down the cosine, where the step count alone would leave it near its peak.
    assert recorder.lrs[-1] < 0.25 * 0.02 < 0.9 * 0.02 < recorder.lrs[0]
    assert all(a >= b for a, b in zip(recorder.lrs, recorder.lrs[1:], strict=False))


def test_parameters_marked_no_weight_decay_are_not_decayed() -> None:
    from memlab.train.trainer import _param_groups

    model = LM.from_mixer("mamba", vocab_size=32, d_model=16, n_layers=1, mixer_options={"d_state": 4})
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in _param_groups(model, 0.1)}
    a_log = model.blocks[0].mixer.A_log
    assert a_log.dim() == 2 and id(a_log) in groups[0.0] and id(a_log) not in groups[0.1]
    assert id(model.blocks[0].mixer.in_proj.weight) in groups[0.1]


def test_checkpoint_round_trip_gives_identical_logits(tmp_path) -> None:
    path = tmp_path / "sub" / "model.safetensors"
    data = copy_prev(64, 12, 0)
    model = tiny_model(0)
    cfg = TrainConfig(lr=3e-3, epochs=1, batch_size=16, progress=False, checkpoint=str(path))
    train(model, [data], {}, cfg, "cpu")
    assert path.is_file()
    other = tiny_model(1)
    ids = data.inputs[:4]
    assert not torch.equal(other(ids)[0], model(ids)[0])
    load_checkpoint(other, path)
    assert torch.equal(other(ids)[0], model(ids)[0])
    assert other.head.weight is other.embed.weight  # tying survives the round trip
    save_checkpoint(other, tmp_path / "again.safetensors")
    with pytest.raises(ValueError, match="checkpoint path"):
        load_checkpoint(other, tmp_path / "missing.safetensors")
    wrong = LM.from_mixer("attention", vocab_size=32, d_model=32, n_layers=2, n_heads=2)
    with pytest.raises(RuntimeError):
        load_checkpoint(wrong, path)


def test_lr_schedule_values() -> None:
    kw = {"lr": 1.0, "warmup_steps": 4, "total_steps": 14}
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == 1.0  # the cosine starts at the peak
    assert lr_at(9, **kw) == pytest.approx(0.5)  # half way through the 10 cosine steps
    assert lr_at(13, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr_at(14, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, lr=2.0, warmup_steps=0, total_steps=10) == 2.0


def test_trainer_applies_the_schedule(recorder: StepRecorder) -> None:
    data = copy_prev(80, 8, 0)
    cfg = TrainConfig(lr=0.02, epochs=2, batch_size=16, warmup_steps=3, progress=False)
    train(tiny_model(), [data], {}, cfg, "cpu")
    expected = [lr_at(s, lr=0.02, warmup_steps=3, total_steps=10) for s in range(10)]
    assert recorder.lrs == pytest.approx(expected, rel=1e-12)


def test_gradient_clipping_is_respected(recorder: StepRecorder) -> None:
    data = copy_prev(64, 12, 0)
    train(tiny_model(), [data], {}, TrainConfig(lr=1e-3, epochs=1, batch_size=16, grad_clip=None,
                                                progress=False), "cpu")
    unclipped = list(recorder.grad_norms)
    assert min(unclipped) > 0.05  # so a clip at 0.05 binds on every step
    recorder.grad_norms.clear()
    train(tiny_model(), [data], {}, TrainConfig(lr=1e-3, epochs=1, batch_size=16, grad_clip=0.05,
                                                progress=False), "cpu")
    assert len(recorder.grad_norms) == 4
    assert recorder.grad_norms == pytest.approx([0.05] * 4, rel=1e-5)


def test_batches_come_from_one_set_and_sets_are_interleaved() -> None:
    lengths: list[int] = []
    model = tiny_model()
    model.register_forward_pre_hook(
        lambda mod, args: lengths.append(args[0].shape[1]) if mod.training else None
    )
    data = [copy_prev(80, 6, 0), copy_prev(80, 10, 1)]
    train(model, data, {}, TrainConfig(lr=1e-3, epochs=2, batch_size=16, progress=False), "cpu")
    assert sorted(lengths) == [6] * 10 + [10] * 10
    per_epoch = [lengths[:10], lengths[10:]]
    for epoch in per_epoch:
        assert sorted(epoch) == [6] * 5 + [10] * 5
        # Shuffled across sets: not all of one set followed by all of the other.
        assert epoch not in ([6] * 5 + [10] * 5, [10] * 5 + [6] * 5)
    assert per_epoch[0] != per_epoch[1]


class NaNLogits(nn.Module):
    """Logits that are NaN from the first step: a run that has diverged."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) * float("nan")


def test_diverged_run_stops_after_the_epoch() -> None:
    result = train(NaNLogits(32), [copy_prev(64, 8, 0)], {"t": copy_prev(16, 8, 1)},
                   TrainConfig(lr=1e-3, epochs=5, batch_size=16, progress=False), "cpu")
    assert result.epochs_run == 1 and result.steps == 4 and not result.stopped_early
    assert all(math.isnan(x) for x in result.losses)


def test_bad_input_raises_value_error() -> None:
    data = copy_prev(16, 8, 0)
    model = tiny_model()
    cfg = TrainConfig(lr=1e-3, epochs=1, progress=False)
    for kwargs, field in (
        ({"lr": 0.0}, "lr"),
        ({"lr": 1e-3, "epochs": 0}, "epochs"),
        ({"lr": 1e-3, "batch_size": 2.5}, "batch_size"),
        ({"lr": 1e-3, "grad_clip": -1.0}, "grad_clip"),
        ({"lr": 1e-3, "target_accuracy": 1.5}, "target_accuracy"),
        ({"lr": 1e-3, "warmup_steps": -1}, "warmup_steps"),
        ({"lr": 1e-3, "weight_decay": -0.1}, "weight_decay"),
        ({"lr": 1e-3, "max_train_s": 0.0}, "max_train_s"),
        ({"lr": 1e-3, "max_train_s": float("inf")}, "max_train_s"),
    ):
        with pytest.raises(ValueError, match=field):
            TrainConfig(**kwargs)
    with pytest.raises(ValueError, match="train_sets"):
        train(model, [], {}, cfg, "cpu")
    with pytest.raises(ValueError, match="vocab_size=32"):
        train(model, [copy_prev(16, 8, 0, vocab=40)], {}, cfg, "cpu")
    with pytest.raises(ValueError, match="target_accuracy"):
        train(model, [data], {}, TrainConfig(lr=1e-3, target_accuracy=0.5, progress=False), "cpu")
    with pytest.raises(ValueError, match="eval_sets"):
        train(model, [data], {"x": "not data"}, cfg, "cpu")
