"""Trainer with other seeds, options and edge values: determinism, early stop, time cap, warm-up,
clipping and config errors that name the key."""

from __future__ import annotations

import math

import pytest
import torch
from trainhelp import StepRecorder, copy_prev, tiny_model

from memlab import tasks
from memlab.tasks import TokenData
from memlab.train import TrainConfig, lr_at, train


@pytest.mark.parametrize("seed", [3, 12345])
def test_another_seed_reproduces_bit_for_bit_and_differs_from_others(seed: int) -> None:
    data, test = copy_prev(48, 8, seed), copy_prev(16, 8, seed + 1)
    cfg = TrainConfig(lr=3e-3, epochs=2, batch_size=10, seed=seed, progress=False)
    a = train(tiny_model(seed), [data], {"t": test}, cfg, "cpu")
    b = train(tiny_model(seed), [data], {"t": test}, cfg, "cpu")
    assert a.losses == b.losses and a.eval_accuracy == b.eval_accuracy
    assert a.steps == len(a.losses) == 2 * math.ceil(48 / 10)
    other = TrainConfig(lr=3e-3, epochs=2, batch_size=10, seed=seed + 1, progress=False)
    c = train(tiny_model(seed), [data], {"t": test}, other, "cpu")
    assert c.losses != a.losses  # the batch order follows the config's seed


def test_mqar_data_trains_and_evaluates_with_other_sizes() -> None:
    task = tasks.build("mqar", vocab_size=20, seq_len=17, num_pairs=2)
    train_set, test_set = task.make(40, seed=0), task.make(12, seed=1)
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=7, progress=False)
    result = train(tiny_model(0, vocab=20), [train_set], {"t": test_set}, cfg, "cpu")
    assert result.steps == math.ceil(40 / 7) and 0.0 <= result.eval_accuracy["t"] <= 1.0
    assert result.train_tokens == 40 * 17


class PrevTokenOracle(torch.nn.Module):
    """Predicts the previous token (copy_prev's labels) exactly; a bias keeps the optimizer busy."""

    def __init__(self, vocab: int = 32) -> None:
        super().__init__()
        self.vocab = vocab
        self.bias = torch.nn.Parameter(torch.zeros(vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        prev = torch.roll(ids, 1, dims=1)
        return 10.0 * torch.nn.functional.one_hot(prev, self.vocab).float() + self.bias


@pytest.mark.parametrize("target", [0.5, 1.0])
def test_early_stop_after_the_first_epoch_that_reaches_the_target(target: float) -> None:
    data, test = copy_prev(40, 8, 0), copy_prev(16, 8, 1)
    cfg = TrainConfig(lr=1e-4, epochs=7, batch_size=8, progress=False, target_accuracy=target)
    result = train(PrevTokenOracle(), [data], {"t": test, "u": test.subset(5)}, cfg, "cpu")
    assert result.stopped_early and result.epochs_run == 1 and result.steps == 5
    assert result.eval_accuracy == {"t": 1.0, "u": 1.0} == result.best_accuracy


def test_no_early_stop_when_one_eval_set_misses_the_target() -> None:
    data, test = copy_prev(40, 8, 0), copy_prev(16, 8, 1)
    wrong = TokenData(test.inputs, torch.where(test.targets >= 0, (test.targets + 1) % 32, test.targets))
    cfg = TrainConfig(lr=1e-4, epochs=3, batch_size=8, progress=False, target_accuracy=0.5)
    result = train(PrevTokenOracle(), [data], {"t": test, "w": wrong}, cfg, "cpu")
    assert not result.stopped_early and result.epochs_run == 3 and result.steps == 15
    assert result.eval_accuracy == {"t": 1.0, "w": 0.0}


def test_target_reached_in_the_last_epoch_is_not_an_early_stop() -> None:
    data, test = copy_prev(40, 8, 0), copy_prev(16, 8, 1)
    cfg = TrainConfig(lr=1e-4, epochs=1, batch_size=8, progress=False, target_accuracy=1.0)
    result = train(tiny_model(0), [data], {"t": test}, cfg, "cpu")
    assert result.epochs_run == 1 and not result.stopped_early


def test_a_time_cap_before_the_first_step_still_evaluates(monkeypatch) -> None:
    clock = iter(range(10**6))
    monkeypatch.setattr("memlab.train.trainer.time.perf_counter", lambda: float(next(clock)))
    data, test = copy_prev(32, 8, 0), copy_prev(16, 8, 1)
    cfg = TrainConfig(lr=1e-3, epochs=3, batch_size=8, max_train_s=0.5, progress=False)
    result = train(tiny_model(0), [data], {"t": test}, cfg, "cpu")
    assert result.stopped_by_time and result.steps == 0 and result.losses == []
    # The eval sets are scored even though no step ran: callers read eval_accuracy[name].
    assert set(result.eval_accuracy) == {"t"} and set(result.best_accuracy) == {"t"}
    assert 0.0 <= result.eval_accuracy["t"] <= 1.0


@pytest.mark.parametrize("cap,expected_steps", [(5.0, 4), (9.0, 8)])
def test_time_cap_stops_at_the_step_the_clock_says(monkeypatch, cap: float, expected_steps: int) -> None:
    # One clock reading per batch (plus one at the start of each epoch and of the run).
    clock = iter(range(10**6))
    monkeypatch.setattr("memlab.train.trainer.time.perf_counter", lambda: float(next(clock)))
    data, test = copy_prev(200, 8, 0), copy_prev(16, 8, 1)
    cfg = TrainConfig(lr=1e-3, epochs=2, batch_size=8, max_train_s=cap, progress=False)
    result = train(tiny_model(0), [data], {"t": test}, cfg, "cpu")
    assert result.stopped_by_time and 0 < result.steps < 50
    assert result.steps == len(result.losses)
    assert result.steps <= expected_steps
    assert "t" in result.eval_accuracy and result.epochs_run == 1


@pytest.mark.parametrize("warmup", [1, 3, 7])
def test_warmup_ramps_linearly_then_decays(recorder: StepRecorder, warmup: int) -> None:
    data = copy_prev(40, 8, 0)
    cfg = TrainConfig(lr=2e-3, epochs=2, batch_size=8, warmup_steps=warmup, progress=False)
    train(tiny_model(1), [data], {}, cfg, "cpu")
    total = 2 * 5
    assert len(recorder.lrs) == total
    for step, lr in enumerate(recorder.lrs):
        assert lr == pytest.approx(lr_at(step, lr=2e-3, warmup_steps=warmup, total_steps=total))
    assert recorder.lrs[warmup - 1] == pytest.approx(2e-3)
    assert all(a < b for a, b in zip(recorder.lrs[:warmup], recorder.lrs[1:warmup], strict=False))
    assert all(a >= b for a, b in zip(recorder.lrs[warmup:], recorder.lrs[warmup + 1 :], strict=False))


def test_warmup_longer_than_the_run_never_exceeds_lr(recorder: StepRecorder) -> None:
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=8, warmup_steps=100, progress=False)
    train(tiny_model(1), [copy_prev(24, 8, 0)], {}, cfg, "cpu")
    assert recorder.lrs == pytest.approx([1e-3 * (i + 1) / 100 for i in range(3)])


@pytest.mark.parametrize("clip", [1e-3, 0.05])
def test_gradient_clipping_at_other_thresholds(recorder: StepRecorder, monkeypatch, clip: float) -> None:
    clipped: list[float] = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        clipped.append(max_norm)
        return original(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=8, grad_clip=clip, progress=False)
    train(tiny_model(2), [copy_prev(32, 8, 0)], {}, cfg, "cpu")
    assert clipped == [clip] * 4
    assert all(n <= clip * (1 + 1e-4) for n in recorder.grad_norms)


def test_no_clipping_leaves_gradients_alone(recorder: StepRecorder, monkeypatch) -> None:
    calls: list[float] = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1.0))
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=8, grad_clip=None, progress=False)
    train(tiny_model(2), [copy_prev(32, 8, 0)], {}, cfg, "cpu")
    assert calls == [] and len(recorder.grad_norms) == 4


@pytest.mark.parametrize("key", ["lrr", "epoch", "max_train_seconds", "clip"])
def test_unknown_config_key_is_named(key: str) -> None:
    # A dataclass's own TypeError names the key (suites check their train keys before this).
    with pytest.raises(TypeError, match=key):
        TrainConfig(lr=1e-3, **{key: 1})


def test_missing_lr_is_named() -> None:
    with pytest.raises(TypeError, match="lr"):
        TrainConfig()


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"lr": float("nan")}, "lr"),
        ({"lr": True}, "lr"),
        ({"lr": 1e-3, "epochs": True}, "epochs"),
        ({"lr": 1e-3, "seed": -1}, "seed"),
        ({"lr": 1e-3, "grad_clip": 0}, "grad_clip"),
        ({"lr": 1e-3, "grad_clip": float("inf")}, "grad_clip"),
        ({"lr": 1e-3, "target_accuracy": 0.0}, "target_accuracy"),
        ({"lr": 1e-3, "max_train_s": -1}, "max_train_s"),
        ({"lr": 1e-3, "progress": 1}, "progress"),
        ({"lr": 1e-3, "checkpoint": 3}, "checkpoint"),
    ],
)
def test_bad_config_values_are_named(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_bad_data_is_named_before_training() -> None:
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=8, progress=False)
    model = tiny_model(0)
    unlabelled = TokenData(torch.zeros(4, 8, dtype=torch.int64), torch.full((4, 8), -100))
    with pytest.raises(ValueError, match="eval_sets\\['u'\\]"):
        train(model, [copy_prev(16, 8, 0)], {"u": unlabelled}, cfg, "cpu")
    negative = TokenData(torch.full((4, 8), -3), torch.full((4, 8), -100))
    with pytest.raises(ValueError, match="train_sets\\[0\\]"):
        train(model, [negative], {}, cfg, "cpu")
    bad_target = copy_prev(4, 8, 0)
    bad_target.targets[0, 3] = -7
    with pytest.raises(ValueError, match="train_sets\\[0\\]"):
        train(model, [bad_target], {}, cfg, "cpu")
