"""Passkey task: layout of needle and question, labels, depth law, filler kinds, seeds, errors."""

from __future__ import annotations

import pytest
import torch

from memlab import tasks
from memlab.tasks.base import IGNORE_INDEX
from memlab.tasks.passkey import Passkey


def make(n: int = 400, seed: int = 0, **cfg) -> tuple[Passkey, tasks.TokenData]:
    opts = {"seq_len": 64, "key_len": 4, **cfg}
    task = tasks.build("passkey", **opts)
    return task, task.make(n, seed)


def test_registry_and_vocabulary_layout() -> None:
    assert "passkey" in tasks.names()
    task = tasks.build("passkey")
    assert (task.config.seq_len, task.config.key_len, task.config.filler) == (1024, 5, "random")
    # digits 0..9, KEY, QUERY, then 32 filler ids
    assert (task.key_token, task.query_token, task.filler_start, task.vocab_size) == (10, 11, 12, 44)


@pytest.mark.parametrize("filler", ["random", "repeat"])
def test_needle_question_and_labels(filler: str) -> None:
    task, d = make(filler=filler)
    length, k = task.config.seq_len, task.config.key_len
    starts = task.needle_start(d.inputs)
    for x, y, p in zip(d.inputs.tolist(), d.targets.tolist(), starts.tolist(), strict=True):
        key = x[p + 1 : p + 1 + k]
        assert x[p] == task.key_token and all(0 <= t < task.config.n_digits for t in key)
        # the question: QUERY then the first k-1 digits, all in the last k positions
        assert x[length - k] == task.query_token and x[length - k + 1 :] == key[:-1]
        # labels: the next token of the answer at each question position, nothing anywhere else
        assert y[length - k :] == key
        assert all(t == IGNORE_INDEX for t in y[: length - k])
        # digits and markers appear only in the needle and the question
        rest = x[:p] + x[p + 1 + k : length - k]
        assert all(t >= task.filler_start for t in rest)
        assert p + k + 1 <= length - k


def test_teacher_forced_oracle_scores_one() -> None:
    """A model that copies the token after the matching needle digit gets every label right,
    which checks the next-token convention of the labels."""
    task, d = make(n=50, key_len=5)
    k = task.config.key_len
    starts = task.needle_start(d.inputs)
    logits = torch.full((*d.inputs.shape, task.vocab_size), -1.0)
    for i, p in enumerate(starts.tolist()):
        key = d.inputs[i, p + 1 : p + 1 + k]
        for j in range(k):  # position L-k+j (QUERY, d1, ..) predicts d_(j+1)
            logits[i, task.config.seq_len - k + j, key[j]] = 1.0
    assert tasks.accuracy(logits, d.targets) == 1.0
    # shifting the answer by one position is wrong almost everywhere
    assert tasks.accuracy(logits.roll(1, dims=1), d.targets) < 0.3


def test_depth_is_uniform_over_the_haystack_and_fixed_depths_are_exact() -> None:
    task, d = make(n=6000, seed=1)
    depth = task.depth(d.inputs)
    assert depth.min() >= 0 and depth.max() <= 1
    hist = torch.histc(depth.float(), bins=5, min=0, max=1) / len(depth)
    assert (hist - 0.2).abs().max() < 0.03
    starts = task.needle_start(d.inputs)
    assert starts.min() == 0 and starts.max() == task.max_needle_start
    for depth_value in (0.0, 0.5, 1.0):
        t, dd = make(n=20, depth_min=depth_value, depth_max=depth_value)
        expected = round(depth_value * t.max_needle_start)
        assert (t.needle_start(dd.inputs) == expected).all()
    t, dd = make(n=500, depth_min=0.25, depth_max=0.5)
    dep = t.depth(dd.inputs)
    assert dep.min() >= 0.25 - 1 / t.max_needle_start and dep.max() <= 0.5 + 1 / t.max_needle_start


def test_passkey_digits_are_iid_uniform() -> None:
    task, d = make(n=4000, key_len=5)
    k = task.config.key_len
    keys = d.targets[:, -k:]
    counts = torch.bincount(keys.reshape(-1), minlength=10).double()
    assert counts.numel() == 10 and (counts / counts.sum() - 0.1).abs().max() < 0.01
    # repeats allowed: P(all 5 distinct) = 10*9*8*7*6 / 10^5 = 0.3024
    distinct = (keys.sort(1).values.diff(dim=1) != 0).all(1).double().mean()
    assert abs(distinct - 0.3024) < 0.03


def test_random_filler_is_uniform_and_repeat_filler_is_the_phrase() -> None:
    task, d = make(n=500, filler="random", filler_vocab=8)
    filler = d.inputs[d.inputs >= task.filler_start] - task.filler_start
    counts = torch.bincount(filler, minlength=8).double()
    assert (counts / counts.sum() - 1 / 8).abs().max() < 0.01

    task, d = make(n=100, filler="repeat", period=7, filler_vocab=8, phrase_seed=3)
    phrase = task.phrase()
    assert phrase.shape == (7,) and phrase.min() >= task.filler_start
    expected = phrase.repeat(10)[: task.config.seq_len]
    outside = d.inputs >= task.filler_start
    assert (d.inputs == expected)[outside].all()
    # the needle and question overwrite the phrase, nothing else does: at most 2k+1 positions per row
    assert ((d.inputs != expected).sum(1) <= 2 * task.config.key_len + 1).all()
    # the phrase belongs to the task, not to the draw: another seed keeps it, another phrase_seed not
    _, d2 = make(n=100, seed=5, filler="repeat", period=7, filler_vocab=8, phrase_seed=3)
    assert (d2.inputs == expected)[d2.inputs >= task.filler_start].all()
    other, _ = make(n=1, filler="repeat", period=7, filler_vocab=8, phrase_seed=4)
    assert not torch.equal(other.phrase(), phrase)


def test_seeds_reproduce_and_differ() -> None:
    _, a = make(seed=0)
    _, b = make(seed=0)
    _, c = make(seed=1)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert (a.inputs != c.inputs).any(1).all(), "every sequence of another seed should differ"


def test_shortest_sequence_has_no_filler() -> None:
    task, d = make(n=5, seq_len=9, key_len=4)
    assert task.max_needle_start == 0
    x = d.inputs[0].tolist()
    assert x[0] == task.key_token and x[5] == task.query_token and x[6:] == x[1:4]
    assert task.depth(d.inputs).eq(0).all()


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"seq_len": 8, "key_len": 4}, r"seq_len=8 must be >= 2 \* key_len \+ 1 = 9"),
        ({"key_len": 0}, r"PasskeyConfig.key_len must be a positive int, got 0"),
        ({"n_digits": 1}, r"PasskeyConfig.n_digits must be an int >= 2, got 1"),
        ({"filler": "text"}, r"PasskeyConfig.filler must be one of \('random', 'repeat'\), got 'text'"),
        ({"depth_min": 0.7, "depth_max": 0.2}, r"depth_min=0.7 must be <= depth_max=0.2"),
        ({"depth_max": 1.5}, r"PasskeyConfig.depth_max must be a number in \[0, 1\], got 1.5"),
        ({"period": 0}, r"PasskeyConfig.period must be a positive int, got 0"),
        ({"colour": 1}, r"unknown config key\(s\) \['colour'\] for task 'passkey'"),
    ],
)
def test_bad_config_names_the_value(cfg: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tasks.build("passkey", **cfg)


def test_bad_arguments() -> None:
    task = tasks.build("passkey", seq_len=32, key_len=3)
    with pytest.raises(ValueError, match="num_examples must be a positive int, got 0"):
        task.make(0, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        task.make(3, seed=-1)
    with pytest.raises(ValueError, match=r"inputs must have shape \(N, seq_len=32\), got \(2, 16\)"):
        task.needle_start(torch.zeros(2, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="exactly one KEY marker per row"):
        task.needle_start(torch.full((2, 32), task.filler_start, dtype=torch.int64))
