"""Task generators at other sizes, seeds and edge values: MQAR, token passkey and NIAH prompts."""

from __future__ import annotations

import pytest
import torch

from memlab import tasks
from memlab.tasks import IGNORE_INDEX
from memlab.tasks.mqar import MQAR, MQARConfig
from memlab.tasks.passkey import Passkey, PasskeyConfig


# -- MQAR ---------------------------------------------------------------------------------
def _check_mqar(task: MQAR, n: int, seed: int) -> None:
    c = task.config
    data = task.make(n, seed=seed)
    p, half, length = c.num_pairs, c.vocab_size // 2, c.seq_len
    assert data.inputs.shape == (n, length) and data.targets.shape == (n, length)
    keys, values = data.inputs[:, 0 : 2 * p : 2], data.inputs[:, 1 : 2 * p : 2]
    # Keys in [1, V/2), values in [V/2, V), distinct within a row.
    assert int(keys.min()) >= 1 and int(keys.max()) < half
    assert int(values.min()) >= half and int(values.max()) < c.vocab_size
    assert int(data.inputs.min()) >= 0 and int(data.inputs.max()) < c.vocab_size
    for row in range(n):
        assert len(set(keys[row].tolist())) == p
        assert len(set(values[row].tolist())) == p
    # No label inside the pairs; labels only where a key is asked, and each key asked exactly once.
    assert bool((data.targets[:, : 2 * p] == IGNORE_INDEX).all())
    labelled = data.targets != IGNORE_INDEX
    assert labelled.sum(1).tolist() == [p] * n
    for row in range(n):
        pos = labelled[row].nonzero().flatten()
        assert all((int(q) - 2 * p) % 2 == 0 for q in pos)  # query slots at even offsets
        asked = data.inputs[row, pos].tolist()
        assert sorted(asked) == sorted(keys[row].tolist())
        pairs = dict(zip(keys[row].tolist(), values[row].tolist(), strict=True))
        assert data.targets[row, pos].tolist() == [pairs[k] for k in asked]
        assert int(pos.max()) <= length - 1


@pytest.mark.parametrize(
    "vocab,length,pairs",
    [
        (4, 4, 1),  # the smallest vocabulary and length for one pair
        (6, 9, 2),  # odd length and odd vocabulary split
        (7, 33, 2),
        (10, 16, 4),  # exactly 4 pairs: every slot after the pairs is a query
        (2 * 8 + 2, 32, 8),  # the smallest vocabulary for 8 pairs
        (1000, 101, 25),  # the most pairs that fit in 101 tokens
        (50, 64, 1),
    ],
)
@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_layout_at_other_sizes(vocab: int, length: int, pairs: int, random_non_queries: bool) -> None:
    task = tasks.build(
        "mqar", vocab_size=vocab, seq_len=length, num_pairs=pairs, random_non_queries=random_non_queries
    )
    _check_mqar(task, 17, seed=3)
    if not random_non_queries:
        data = task.make(5, seed=4)
        labelled = data.targets != IGNORE_INDEX
        rest = data.inputs[:, 2 * pairs :][~labelled[:, 2 * pairs :]]
        assert bool((rest == 0).all())


@pytest.mark.parametrize("power_a", [0.01, 1.0, 3.0])
def test_mqar_queries_fill_every_slot_when_the_length_is_tight(power_a: float) -> None:
    # L = 4P (+1 odd token): the P queries must take all P slots, whatever the gap law.
    for length in (24, 25):
        task = tasks.build("mqar", vocab_size=64, seq_len=length, num_pairs=6, power_a=power_a)
        data = task.make(32, seed=1)
        slots = torch.arange(12, 24, 2)
        assert bool((data.targets[:, slots] != IGNORE_INDEX).all())
        assert int((data.targets != IGNORE_INDEX).sum()) == 32 * 6


def test_mqar_seeds_reproduce_and_differ_at_other_sizes() -> None:
    task = tasks.build("mqar", vocab_size=300, seq_len=48, num_pairs=5)
    a, b, c = task.make(40, seed=7), task.make(40, seed=7), task.make(40, seed=8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    # A larger draw starts with a different stream only if the law changes; the same seed is stable.
    big = task.make(41, seed=7)
    assert big.inputs.shape[0] == 41


def test_mqar_keys_cover_the_whole_key_range() -> None:
    task = tasks.build("mqar", vocab_size=20, seq_len=16, num_pairs=3)
    data = task.make(400, seed=0)
    keys = set(data.inputs[:, 0:6:2].flatten().tolist())
    values = set(data.inputs[:, 1:6:2].flatten().tolist())
    assert keys == set(range(1, 10)) and values == set(range(10, 20))


@pytest.mark.parametrize(
    "cfg,words",
    [
        ({"seq_len": 15, "num_pairs": 4}, ["seq_len=15", "16"]),
        ({"seq_len": 7, "num_pairs": 2}, ["seq_len=7", "8"]),
        ({"vocab_size": 8, "num_pairs": 4, "seq_len": 64}, ["vocab_size=8", "num_pairs=4"]),
        ({"vocab_size": 3, "num_pairs": 1}, ["vocab_size=3"]),
        ({"vocab_size": 0}, ["vocab_size"]),
        ({"num_pairs": 0}, ["num_pairs"]),
        ({"seq_len": -4}, ["seq_len"]),
        ({"num_pairs": 2.0}, ["num_pairs"]),
        ({"power_a": 0.0}, ["power_a"]),
        ({"power_a": float("nan")}, ["power_a"]),
        ({"random_non_queries": 1}, ["random_non_queries"]),
    ],
)
def test_mqar_impossible_configs_name_the_values(cfg: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        tasks.build("mqar", **cfg)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_mqar_unknown_option_is_named() -> None:
    with pytest.raises(ValueError, match="num_pair"):
        tasks.build("mqar", num_pair=4)


@pytest.mark.parametrize("n,seed", [(0, 0), (-1, 0), (True, 0), (2, -1), (2, 1.5), (2.0, 0)])
def test_mqar_bad_make_arguments(n, seed) -> None:
    with pytest.raises(ValueError):
        MQAR(MQARConfig(vocab_size=16, seq_len=8, num_pairs=2)).make(n, seed=seed)


# -- token passkey ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        {"seq_len": 7, "key_len": 3, "n_digits": 2},  # shortest: 2k + 1, no filler
        {"seq_len": 33, "key_len": 1, "n_digits": 10},
        {"seq_len": 64, "key_len": 7, "n_digits": 4, "filler": "repeat", "period": 5},
        {"seq_len": 101, "key_len": 4, "n_digits": 16, "filler_vocab": 3, "depth_min": 0.25,
         "depth_max": 0.75},
        {"seq_len": 50, "key_len": 2, "depth_min": 1.0, "depth_max": 1.0},
        {"seq_len": 50, "key_len": 2, "depth_min": 0.0, "depth_max": 0.0},
    ],
)
def test_passkey_needle_and_answer_at_other_sizes(cfg: dict) -> None:
    task = Passkey(PasskeyConfig(**cfg))
    c = task.config
    n, k, length = 25, c.key_len, c.seq_len
    data = task.make(n, seed=11)
    assert data.inputs.shape == (n, length)
    assert int(data.inputs.min()) >= 0 and int(data.inputs.max()) < task.vocab_size
    start = task.needle_start(data.inputs)
    depth = task.depth(data.inputs)
    span = max(length - 2 * k - 1, 1)
    for row in range(n):
        s = int(start[row])
        assert data.inputs[row, s] == task.key_token
        digits = data.inputs[row, s + 1 : s + 1 + k]
        assert int(digits.max()) < c.n_digits
        # The question is the last k positions; its labels are the needle's digits, in order.
        assert data.inputs[row, length - k] == task.query_token
        assert data.targets[row, length - k :].tolist() == digits.tolist()
        assert data.inputs[row, length - k + 1 :].tolist() == digits[:-1].tolist()
        assert bool((data.targets[row, : length - k] == IGNORE_INDEX).all())
        # The needle ends before the question and sits at the stated depth.
        assert s + k < length - k
        assert c.depth_min - 1 / span - 1e-9 <= float(depth[row]) <= c.depth_max + 1 / span + 1e-9
        # Digits and markers appear nowhere else.
        other = torch.cat([data.inputs[row, :s], data.inputs[row, s + k + 1 : length - k]])
        assert bool((other >= task.filler_start).all())
    if c.depth_min == c.depth_max:
        expected = round(c.depth_min * (length - 2 * k - 1))
        assert start.tolist() == [expected] * n


def test_passkey_seeds_reproduce_and_differ() -> None:
    task = Passkey(PasskeyConfig(seq_len=40, key_len=3, n_digits=5))
    a, b, c = task.make(30, seed=5), task.make(30, seed=5), task.make(30, seed=6)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize(
    "cfg,word",
    [
        ({"seq_len": 6, "key_len": 3}, "seq_len=6"),
        ({"key_len": 0}, "key_len"),
        ({"n_digits": 1}, "n_digits"),
        ({"filler": "zeros"}, "filler"),
        ({"depth_min": 0.8, "depth_max": 0.2}, "depth_min"),
        ({"depth_max": 1.5}, "depth_max"),
        ({"depth_min": float("nan")}, "depth_min"),
        ({"period": 0}, "period"),
        ({"filler_vocab": 0}, "filler_vocab"),
    ],
)
def test_passkey_bad_configs_name_the_field(cfg: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        tasks.build("passkey", **cfg)


# -- NIAH prompts (pretrained tokenizer, offline) -----------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from memlab.tasks.niah import Niah, NiahConfig

    try:
        return Niah(NiahConfig()).tokenizer()
    except Exception as exc:  # the packaged tokenizer is optional
        pytest.skip(f"no offline tokenizer: {exc}")


@pytest.mark.parametrize(
    "cfg",
    [
        {"variant": "passkey", "length": 200, "digits": 3},
        {"variant": "single", "length": 257, "digits": 7, "depth_min": 0.5, "depth_max": 0.5},
        {"variant": "multikey", "length": 400, "n_keys": 3, "digits": 4},
        {"variant": "multivalue", "length": 333, "n_values": 2, "digits": 6},
        {"variant": "single", "length": 300, "depth_min": 0.0, "depth_max": 0.0},
        {"variant": "single", "length": 300, "depth_min": 1.0, "depth_max": 1.0, "chat": False},
    ],
)
def test_niah_needles_lengths_and_answers(tokenizer, cfg: dict) -> None:
    from memlab.tasks.niah import Niah, NiahConfig, exact_match

    task = Niah(NiahConfig(**cfg))
    c = task.config
    samples = task.samples(tokenizer, 3, seed=9)
    for s in samples:
        assert len(s.prompt_ids) == c.length
        n_needles = {"passkey": 1, "single": 1, "multikey": c.n_keys, "multivalue": c.n_values}[c.variant]
        assert len(s.needle_positions) == n_needles == len(s.depths)
        values = s.values
        assert all(len(v) == c.digits and v.isdigit() and v[0] != "0" for v in values)
        assert len(set(values)) == len(values)
        text = tokenizer.decode(s.context_ids)
        for v in values:
            assert v in text  # the needle really is in the context
        if c.variant != "multivalue":
            assert s.answer in text
        # Needles sit at their positions, in order, at their depths (within one sentence).
        assert s.needle_positions == sorted(s.needle_positions)
        assert all(c.depth_min <= d <= c.depth_max for d in s.depths)
        for pos in s.needle_positions:
            assert 0 < pos < len(s.context_ids)
        if n_needles == 1:
            needle = tokenizer.decode(s.context_ids[s.needle_positions[0] :])
            assert needle.lstrip().startswith("The")
            assert s.answer in needle[:120]
        # The answer tokens decode to the answer; the question does not leak it.
        assert tokenizer.decode(s.answer_ids).strip() == s.answer
        assert not any(v in tokenizer.decode(s.question_ids) for v in values)
        assert exact_match(f"it is {s.answer}.", s)
        assert not exact_match("no idea", s)
    # The depth is honoured: a needle at depth 0 opens the haystack, at depth 1 closes it.
    if c.depth_max == 0.0 or c.depth_min == 1.0:
        head = samples[0]
        rel = head.needle_positions[0] / len(head.context_ids)
        assert (rel < 0.5) if c.depth_max == 0.0 else (rel > 0.5)


def test_niah_seeds_reproduce_and_differ(tokenizer) -> None:
    from memlab.tasks.niah import Niah, NiahConfig

    task = Niah(NiahConfig(variant="single", length=256))
    a, b = task.samples(tokenizer, 3, seed=1), task.samples(tokenizer, 3, seed=1)
    c = task.samples(tokenizer, 3, seed=2)
    assert [s.values for s in a] == [s.values for s in b]
    assert all(torch.equal(x.prompt_ids, y.prompt_ids) for x, y in zip(a, b, strict=True))
    assert [s.values for s in a] != [s.values for s in c]


@pytest.mark.parametrize(
    "cfg,word",
    [
        ({"variant": "nope"}, "variant"),
        ({"haystack": "web"}, "haystack"),
        ({"length": 0}, "length"),
        ({"digits": 0}, "digits"),
        ({"n_keys": 11, "variant": "multikey"}, "n_keys"),
        ({"depth_min": 0.9, "depth_max": 0.1}, "depth"),
        # More distinct values than the digits allow: an error, not an endless loop.
        ({"variant": "multivalue", "n_values": 10, "digits": 1}, "n_values"),
        ({"variant": "multikey", "n_keys": 10, "digits": 1}, "n_keys"),
        ({"depth_min": "0.1"}, "depth_min"),
    ],
)
def test_niah_bad_configs_name_the_field(cfg: dict, word: str) -> None:
    from memlab.tasks.niah import NiahConfig

    with pytest.raises(ValueError, match=word):
        NiahConfig(**cfg)


def test_niah_too_short_length_is_a_clear_error(tokenizer) -> None:
    from memlab.tasks.niah import Niah, NiahConfig

    with pytest.raises(ValueError, match="length=40 is too short"):
        Niah(NiahConfig(variant="multikey", length=40)).samples(tokenizer, 1, seed=0)


@pytest.mark.parametrize("depth,haystack", [(0.25, "synthetic"), (0.5, "real"), (0.8, "synthetic")])
def test_niah_single_needle_sits_at_its_depth(tokenizer, depth: float, haystack: str) -> None:
    from memlab.tasks.niah import Niah, NiahConfig, _chat_parts, _texts

    task = Niah(NiahConfig(variant="single", length=600, haystack=haystack, depth_min=depth, depth_max=depth))
    for s in task.samples(tokenizer, 2, seed=4):
        text = f" The secret code for the vault is {s.answer}."
        needle = tokenizer(text, add_special_tokens=False)["input_ids"]
        (pos,) = s.needle_positions
        assert s.context_ids[pos : pos + len(needle)].tolist() == needle
        chat_head, _ = _chat_parts(tokenizer, True)
        intro = _texts("single", ["vault"], "vault", [s.answer], 1)["intro"]
        hay_start = len(tokenizer(chat_head + intro + "\n\n", add_special_tokens=False)["input_ids"])
        n_hay = len(s.context_ids) - len(needle) - hay_start
        offset = pos - hay_start
        assert 0 <= offset <= n_hay
        assert s.depths == [depth]
        # Nearest sentence start: within one sentence (< 40 tokens) of depth * haystack length.
        assert abs(offset - depth * n_hay) < 40, (offset, depth * n_hay)
