"""MQAR generator properties (zoology protocol) and the task registry / TokenData contract."""

from __future__ import annotations

import pytest
import torch

from memlab import tasks
from memlab.tasks.base import IGNORE_INDEX
from memlab.tasks.mqar import gap_probabilities


def make(n: int = 500, seed: int = 0, **cfg) -> tuple[tasks.Task, tasks.TokenData]:
    opts = {"vocab_size": 64, "seq_len": 48, "num_pairs": 6, **cfg}
    task = tasks.build("mqar", **opts)
    return task, task.make(n, seed)


def test_registry_and_defaults() -> None:
    assert "mqar" in tasks.names()
    task = tasks.build("mqar")
    assert task.vocab_size == 8192
    assert (task.config.seq_len, task.config.num_pairs, task.config.power_a) == (64, 4, 0.01)
    assert task.config.random_non_queries is True


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_every_label_is_the_value_paired_with_its_key(random_non_queries: bool) -> None:
    task, d = make(random_non_queries=random_non_queries)
    p = task.config.num_pairs
    for x, y in zip(d.inputs.tolist(), d.targets.tolist(), strict=True):
        pairs = dict(zip(x[0 : 2 * p : 2], x[1 : 2 * p : 2], strict=True))
        labelled = [t for t, v in enumerate(y) if v != IGNORE_INDEX]
        # One label per pair, and each label asks for the value stored with the key that sits at
        # that position (the value is the next token the model must produce there).
        assert len(labelled) == p
        for t in labelled:
            assert t >= 2 * p and (t - 2 * p) % 2 == 0
            assert y[t] == pairs[x[t]]
        # Each key of the prefix is queried exactly once.
        assert sorted(x[t] for t in labelled) == sorted(pairs)


def test_key_and_value_ranges_and_distinctness() -> None:
    task, d = make(n=2000)
    p, half = task.config.num_pairs, task.vocab_size // 2
    keys, values = d.inputs[:, 0 : 2 * p : 2], d.inputs[:, 1 : 2 * p : 2]
    assert keys.min() >= 1 and keys.max() < half
    assert values.min() >= half and values.max() < task.vocab_size
    # Distinct within every example.
    assert (keys.sort(1).values.diff(dim=1) != 0).all()
    assert (values.sort(1).values.diff(dim=1) != 0).all()
    # Every key and every value token is used somewhere (uniform over the whole half).
    assert keys.unique().numel() == half - 1
    assert values.unique().numel() == task.vocab_size - half
    assert d.inputs.min() >= 0 and d.inputs.max() < task.vocab_size


def test_filler_tokens() -> None:
    task, d = make(n=300, random_non_queries=False)
    p = task.config.num_pairs
    filler = d.targets[:, 2 * p :] == IGNORE_INDEX
    assert (d.inputs[:, 2 * p :][filler] == 0).all()
    task, d = make(n=300, random_non_queries=True)
    rest = d.inputs[:, 2 * p :][d.targets[:, 2 * p :] == IGNORE_INDEX]
    # Uniform over the whole vocabulary: every token appears, none dominates.
    counts = torch.bincount(rest, minlength=task.vocab_size).double()
    assert (counts > 0).all()
    assert counts.max() < 3 * counts.mean()


def test_gaps_follow_the_power_law() -> None:
    task, d = make(n=20000, seed=3, power_a=0.01)
    p, slots = task.config.num_pairs, (task.config.seq_len - 2 * task.config.num_pairs) // 2
    # The first key's slot is the first draw, whose law is exactly p(g).
    first_key = d.inputs[:, 0:1]
    region = d.inputs[:, 2 * p :: 2] == first_key
    asked = region & (d.targets[:, 2 * p :: 2] != IGNORE_INDEX)
    gap = asked.float().argmax(1)
    freq = torch.bincount(gap, minlength=slots).double() / len(d)
    expected = gap_probabilities(slots, 0.01)
    # Binomial standard error at N=20000 is below 0.0035; allow about 4 of them.
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    assert expected[0] > 5 * expected[-1]
    # power_a = 1 is uniform.
    torch.testing.assert_close(gap_probabilities(7, 1.0), torch.full((7,), 1 / 7, dtype=torch.float64))


def test_deterministic_per_seed_and_different_across_seeds() -> None:
    _, a = make(seed=11)
    _, b = make(seed=11)
    _, c = make(seed=12)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert (a.inputs != c.inputs).float().mean() > 0.5
    # Train and test drawn from different seeds share (almost) no sequence.
    train = {tuple(r) for r in a.inputs.tolist()}
    assert sum(tuple(r) in train for r in c.inputs.tolist()) == 0


def test_both_sampling_paths_give_distinct_keys() -> None:
    # (4, 16) takes the redraw-on-repeat path, (30, 120) the top-k path.
    for pairs, length in ((4, 16), (30, 120)):
        task = tasks.build("mqar", vocab_size=64, seq_len=length, num_pairs=pairs)
        d = task.make(200, 0)
        keys = d.inputs[:, 0 : 2 * pairs : 2]
        assert (keys.sort(1).values.diff(dim=1) != 0).all()
        assert keys.min() >= 1 and keys.max() < 32


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        ({"seq_len": 15, "num_pairs": 4}, "seq_len"),
        ({"num_pairs": 0}, "num_pairs"),
        ({"vocab_size": 8, "num_pairs": 4, "seq_len": 64}, "vocab_size"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"power_a": 0.0}, "power_a"),
        ({"power_a": float("nan")}, "power_a"),
        ({"random_non_queries": 1}, "random_non_queries"),
        ({"seq_len": 64.0}, "seq_len"),
        ({"num_kv_pairs": 4}, "num_kv_pairs"),
    ],
)
def test_bad_config_names_the_field(cfg: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tasks.build("mqar", **cfg)


def test_bad_make_arguments_and_unknown_task() -> None:
    task = tasks.build("mqar", vocab_size=64, seq_len=32, num_pairs=4)
    with pytest.raises(ValueError, match="num_examples"):
        task.make(0, 0)
    with pytest.raises(ValueError, match="seed"):
        task.make(4, -1)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.build("nope")


def test_token_data_and_accuracy() -> None:
    _, d = make(n=10)
    assert len(d) == 10 and d.seq_len == 48
    sub = d.subset(3)
    assert torch.equal(sub.inputs, d.inputs[:3]) and torch.equal(sub.targets, d.targets[:3])
    assert torch.equal(d.to("cpu").inputs, d.inputs)
    with pytest.raises(ValueError, match="subset n"):
        d.subset(11)
    with pytest.raises(ValueError, match="targets shape"):
        tasks.TokenData(d.inputs, d.targets[:, :5])
    with pytest.raises(ValueError, match="inputs"):
        tasks.TokenData(d.inputs.float(), d.targets)

    # Perfect logits on half of the labelled positions -> accuracy 0.5 exactly.
    targets = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 1], [0, IGNORE_INDEX, 3, IGNORE_INDEX]])
    logits = torch.zeros(2, 4, 5)
    logits[0, 1, 2] = 1.0  # right
    logits[0, 3, 4] = 1.0  # wrong
    logits[1, 0, 0] = 1.0  # right
    logits[1, 2, 1] = 1.0  # wrong
    logits[0, 0, 3] = 9.0  # an unlabelled position never counts
    assert tasks.accuracy(logits, targets) == 0.5
    with pytest.raises(ValueError, match="no labelled"):
        tasks.accuracy(logits, torch.full((2, 4), IGNORE_INDEX))
    with pytest.raises(ValueError, match="logits must be"):
        tasks.accuracy(logits[0], targets)
