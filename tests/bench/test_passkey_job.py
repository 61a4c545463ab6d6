"""The ``passkey`` run kind: expansion and config errors, measurements on known models, and one tiny
end-to-end CPU suite through the runner (1 epoch) with its report."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from memlab import mixers, tasks
from memlab.bench.jobs import Overrides, RunContext, build_job
from memlab.bench.jobs import passkey as passkey_job
from memlab.bench.jobs.passkey import prefill_and_decode, score_passkey
from memlab.bench.report import write_report
from memlab.bench.runner import expand_suite, load_suite, run_suite
from memlab.bench.store import Store
from memlab.models.lm import LM, LMConfig

CPU = torch.device("cpu")

TINY = """
[suite]
description = "tiny passkey"

[passkey]
job = "passkey"
n_layers = 1
d_model = 16
lr = 3e-3
task_options = { key_len = 2, filler_vocab = 6 }
train = { epochs = 1, batch_size = 8 }
train_sets = [ { seq_len = 24, num_examples = 16 } ]
test_sets = [
    { seq_len = 24, num_examples = 8 },
    { seq_len = 48, num_examples = 8 },
]
measure = { eval_tokens = 96, decode_steps = 3, decode_warmup = 1, depth_bins = 2 }
{extra}

[[passkey.mixers]]
name = "attention"
options = { n_heads = 2 }

[[passkey.mixers]]
name = "mamba"
options = { d_state = 4, chunk_size = 8 }

[[passkey.mixers]]
name = "landmark"
options = { n_heads = 2, block_size = 4 }
test_options = { mode = "topk", top_k = 2 }
{mixer_extra}
"""


def write(tmp_path: Path, extra: str = "", mixer_extra: str = "") -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(textwrap.dedent(TINY.replace("{extra}", extra).replace("{mixer_extra}", mixer_extra)))
    return path


def test_expand_adds_measure_and_test_options(tmp_path) -> None:
    specs, notes = expand_suite(load_suite(write(tmp_path)))
    assert notes == [] and [s.config["mixer"] for s in specs] == ["attention", "mamba", "landmark"]
    assert all(s.config["task"] == "passkey" for s in specs)
    assert specs[0].config["measure"] == {
        "eval_tokens": 96,
        "decode_steps": 3,
        "decode_warmup": 1,
        "depth_bins": 2,
    }
    assert specs[0].config["test_options"] == {} and specs[2].config["test_options"] == {
        "mode": "topk",
        "top_k": 2,
    }
    # the test options take part in the run id: changing them makes a new run
    (tmp_path / "b").mkdir()
    path = tmp_path / "b" / "tiny.toml"  # the same suite name, so only the options can change ids
    path.write_text(write(tmp_path).read_text().replace("top_k = 2", "top_k = 1"))
    other, _ = expand_suite(load_suite(path))
    assert other[0].id == specs[0].id and other[2].id != specs[2].id


def test_lm_layers_gives_one_row_its_own_depth(tmp_path) -> None:
    more = '\n[[passkey.mixers]]\nname = "mamba"\nlabel = "deep mamba"\nlm_layers = 3\n'
    specs, _ = expand_suite(load_suite(write(tmp_path, mixer_extra=more)))
    assert {s.config["label"]: s.config["n_layers"] for s in specs} == {
        "attention": 1,
        "mamba": 1,
        "landmark": 1,
        "deep mamba": 3,
    }
    bad = write(tmp_path, mixer_extra=more.replace("lm_layers = 3", "lm_layers = 0"))
    with pytest.raises(ValueError, match="mixers\\[3\\] lm_layers must be a positive int, got 0"):
        expand_suite(load_suite(bad))


def test_mixer_option_named_n_layers_reaches_the_mixer(tmp_path) -> None:
    """MemMamba's own n_layers (layers inside the mixer) must not become the LM's depth."""
    text = TINY.split("[[passkey.mixers]]")[0].replace("{extra}", "")
    text += '[[passkey.mixers]]\nname = "memmamba"\nlm_layers = 1\n'
    text += (
        "options = { n_layers = 2, pool_size = 3, d_summary = 8, n_heads = 2, d_state = 4, chunk_size = 8 }\n"
    )
    path = tmp_path / "mm.toml"
    path.write_text(text)
    (spec,), _ = expand_suite(load_suite(path))
    config = {k: v for k, v in spec.config.items() if k not in ("suite", "section", "job")}
    config["test_sets"] = config["test_sets"][:1]
    metrics = build_job("passkey").run(config, RunContext(device=CPU, progress=False))
    options = spec.config["mixer_options"]
    vocab = tasks.build("passkey", **spec.config["task_options"]).vocab_size
    expected = LM(LMConfig(vocab_size=vocab, d_model=16, layers=[{"mixer": "memmamba", **options}]))
    assert metrics["num_params"] == expected.num_params()
    assert len(expected.blocks) == 1 and len(expected.blocks[0].mixer.layers) == 2


def test_shipped_passkey_suite_expands() -> None:
    specs, _ = expand_suite(load_suite("passkey"))
    assert specs, "the passkey suite must hold runs"
    cfg = specs[0].config
    train_lengths = {s["seq_len"] for s in cfg["train_sets"]}
    test_lengths = {s["seq_len"] for s in cfg["test_sets"]}
    assert {1024, 2048} <= train_lengths and max(train_lengths) == 2048
    assert {1024, 4096, 16384} <= test_lengths and max(test_lengths) > 16384
    assert {"attention", "mamba"} <= {s.config["mixer"] for s in specs}


@pytest.mark.parametrize(
    "extra, mixer_extra, match",
    [
        ("", 'test_options = { mode = "fast" }', "mode must be one of"),
        ("", "test_options = { colour = 1 }", r"unknown config key\(s\) \['colour'\] for mixer 'landmark'"),
        ("", "test_options = 3", "test_options must be a table, got 3"),
    ],
)
def test_test_option_errors(tmp_path, extra: str, mixer_extra: str, match: str) -> None:
    # mixer_extra lands in the last row (landmark) and replaces its test_options line
    text = TINY.replace('test_options = { mode = "topk", top_k = 2 }', mixer_extra)
    path = tmp_path / "bad.toml"
    path.write_text(text.replace("{extra}", extra).replace("{mixer_extra}", ""))
    with pytest.raises(ValueError, match=match):
        expand_suite(load_suite(path))


@pytest.mark.parametrize(
    "extra, match",
    [
        ("measure = { eval_tokens = 0 }", r"measure.eval_tokens must be an int >= 1, got 0"),
        ("measure = { steps = 3 }", r"unknown key\(s\) \['steps'\] in tiny.toml \[passkey\] measure"),
    ],
)
def test_measure_errors(tmp_path, extra: str, match: str) -> None:
    text = TINY.replace(
        "measure = { eval_tokens = 96, decode_steps = 3, decode_warmup = 1, depth_bins = 2 }", extra
    )
    path = tmp_path / "tiny.toml"
    path.write_text(text.replace("{extra}", "").replace("{mixer_extra}", ""))
    with pytest.raises(ValueError, match=match):
        expand_suite(load_suite(path))


class Oracle(torch.nn.Module):
    """Reads the passkey out of the needle: a perfect model of the task, wrong on chosen rows."""

    def __init__(self, task, wrong_rows: set[int]) -> None:
        super().__init__()
        self.task, self.wrong_rows, self.calls = task, wrong_rows, 0

    def forward(self, ids: torch.Tensor):
        k, length = self.task.config.key_len, ids.shape[1]
        logits = torch.zeros(*ids.shape, self.task.vocab_size)
        starts = self.task.needle_start(ids)
        for i, p in enumerate(starts.tolist()):
            row = self.calls + i
            for j in range(k):
                digit = int(ids[i, p + 1 + j])
                if row in self.wrong_rows and j == k - 1:
                    digit = (digit + 1) % self.task.config.n_digits  # last digit wrong
                logits[i, length - k + j, digit] = 1.0
        self.calls += ids.shape[0]
        return logits, []


def test_score_passkey_counts_digits_exact_and_depth() -> None:
    task = tasks.build("passkey", seq_len=40, key_len=4)
    data = task.make(20, seed=0)
    depth = task.depth(data.inputs)
    wrong = {i for i in range(20) if depth[i] >= 0.5}
    out = score_passkey(Oracle(task, wrong), task, data, batch_size=6, depth_bins=2, device=CPU)
    assert out["accuracy"] == pytest.approx(1 - len(wrong) / 20 / 4)
    assert out["exact_match"] == pytest.approx(1 - len(wrong) / 20)
    # every wrong row sits in the deep bin: the shallow bin is perfect, the deep bin all wrong
    assert out["depth_exact_match"] == [1.0, 0.0]


def test_prefill_state_and_decode_times() -> None:
    torch.manual_seed(0)
    for name, opts in (("attention", {"n_heads": 2}), ("mamba", {"d_state": 4, "chunk_size": 8})):
        lm = LM.from_mixer(name, vocab_size=20, d_model=16, n_layers=2, **opts)
        out = {
            n: prefill_and_decode(lm, torch.randint(0, 20, (1, n)), steps=3, warmup=1, device=CPU)
            for n in (16, 32)
        }
        assert all(o["decode_mean_s"] > 0 and o["decode_median_s"] > 0 for o in out.values())
        if name == "attention":
            # keys and values of 2 layers, (1, 2 heads, L, 8) float32 each: 2 * 2 * 2*L*8*4 bytes
            assert out[16]["state_bytes"] == 2 * 2 * 16 * 16 * 4
            assert out[32]["state_bytes"] == 2 * out[16]["state_bytes"]
        else:
            assert out[16]["state_bytes"] == out[32]["state_bytes"] > 0
        assert out[16]["read_counters"] is None
    with pytest.raises(ValueError, match=r"ids must have shape \(1, L\)"):
        prefill_and_decode(lm, torch.zeros(2, 4, dtype=torch.int64), steps=1, warmup=0, device=CPU)


def test_tiny_suite_end_to_end(tmp_path, monkeypatch) -> None:
    suite = load_suite(write(tmp_path))
    real_score = passkey_job.score_passkey

    def oom_at_48(model, task, data, **kw):
        # what a device out-of-memory at the longest length looks like to the job
        if data.seq_len == 48 and model.blocks[0].mixer.name == "mamba":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")
        return real_score(model, task, data, **kw)

    monkeypatch.setattr(passkey_job, "score_passkey", oom_at_48)
    with Store(tmp_path / "runs.sqlite") as store:
        result = run_suite(
            suite, store, device=CPU, overrides=Overrides(epochs=1), progress=False, log=lambda s: None
        )
        assert (result.done, result.failed) == (3, 0), result.failed_names
        recs = {r.config["mixer"]: r for r in store.records(suite="tiny")}
    for r in recs.values():
        m = r.metrics
        assert m["epochs_run"] == 1 and m["steps"] == 2 and m["train_tokens"] == 16 * 24
        for t in m["tests"]:
            if "error" in t:
                continue
            assert 0 <= t["exact_match"] <= t["accuracy"] <= 1
            assert len(t["depth_exact_match"]) == 2
        assert set(m["state_bytes"]) == {"24", "48"}
        assert all(v > 0 for v in m["decode_s_per_token"].values())
    # the recorded OOM leaves the other length's numbers in place
    mamba = recs["mamba"].metrics
    assert mamba["failed_tests"] == ["L48"] and "accuracy" in mamba["tests"][0]
    assert mamba["exact_match"]["L48"] is None and mamba["state_bytes"]["24"] == mamba["state_bytes"]["48"]
    # attention's cache doubles with the length; Landmark's also holds one landmark key per block
    att = recs["attention"].metrics["state_bytes"]
    assert att["48"] == 2 * att["24"]
    land = recs["landmark"].metrics
    assert land["state_bytes"]["48"] > land["state_bytes"]["24"]
    # top-k retrieval at test time: each decoding query reads at most top_k * block_size old tokens
    counters = land["read_counters"]["48"][0]
    assert counters["queries"] == 3 * 2  # 3 timed steps x 2 heads, batch 1
    assert 0 < counters["retrieved_tokens"] <= counters["queries"] * 2 * 4

    paths = write_report(tmp_path / "runs.sqlite", tmp_path / "report", suite="tiny")
    names = {p.name for p in paths.figures}
    assert {"tiny_passkey_passkey_vs_length.png", "tiny_passkey_passkey_depth.png"} <= names
    md = paths.markdown.read_text()
    assert "Best learning rate per (mixer, d_model)" in md and "oom" in md
    assert "| landmark | 16 | 48 | 1 |" in md  # the read counters table


def test_job_is_registered() -> None:
    assert build_job("passkey").name == "passkey"
    assert "landmark" in mixers.names()
