"""The ``mqar`` run kind: grid expansion, config errors, and one real (tiny) training run."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from memlab.bench.jobs import RunContext, build_job
from memlab.bench.jobs.mqar import set_name
from memlab.bench.runner import expand_suite, load_suite

TINY = """
[mqar]
job = "mqar"
d_model = [16, 32]
lr = [1e-3, 3e-3]
task_options = { vocab_size = 64 }
train = { epochs = 1, batch_size = 16 }
train_sets = [ { seq_len = 16, num_pairs = 2, num_examples = 32 } ]
test_sets = [
    { seq_len = 16, num_pairs = 2, num_examples = 8 },
    { seq_len = 32, num_pairs = 4, num_examples = 8 },
]
{extra}

[[mqar.mixers]]
name = "attention"
options = { n_heads = 2 }
{mixer_extra}

[[mqar.mixers]]
name = "linear_attention"
label = "linear"
options = { n_heads = 2 }
sweep = { feature_dim = [4, 8] }
d_model = [16]
"""


def expand(tmp_path: Path, extra: str = "", mixer_extra: str = "", more: str = "") -> list:
    path = tmp_path / "tiny.toml"
    path.write_text(
        TINY.replace("{extra}", extra).replace("{mixer_extra}", mixer_extra) + textwrap.dedent(more)
    )
    specs, notes = expand_suite(load_suite(path))
    return specs, notes


def test_grid_expansion(tmp_path) -> None:
    specs, notes = expand(tmp_path)
    # attention: 2 d_model x 2 lr; linear: 1 d_model x 2 feature_dim x 2 lr
    assert len(specs) == 4 + 4 and notes == []
    att = [s.config for s in specs if s.config["mixer"] == "attention"]
    assert {(c["d_model"], c["lr"]) for c in att} == {(16, 1e-3), (16, 3e-3), (32, 1e-3), (32, 3e-3)}
    lin = [s.config for s in specs if s.config["label"] == "linear"]
    assert {(c["mixer_options"]["feature_dim"], c["lr"]) for c in lin} == {
        (4, 1e-3),
        (4, 3e-3),
        (8, 1e-3),
        (8, 3e-3),
    }
    assert all(c["axes"] == {"mixer.feature_dim": c["mixer_options"]["feature_dim"]} for c in lin)
    assert specs[0].name == "mqar: attention d=16 lr=0.001"
    assert "feature_dim=4" in next(s.name for s in specs if s.config["label"] == "linear")


def test_a_mixer_row_can_change_train_options(tmp_path) -> None:
    specs, _ = expand(tmp_path, mixer_extra="train = { epochs = 3, target_accuracy = 0.9 }")
    att = [s.config["train"] for s in specs if s.config["mixer"] == "attention"]
    lin = [s.config["train"] for s in specs if s.config["label"] == "linear"]
    assert att[0] == {"epochs": 3, "batch_size": 16, "target_accuracy": 0.9}
    assert lin[0] == {"epochs": 1, "batch_size": 16}
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) \['lr'\] in tiny.toml \[mqar\] mixers\[0\] train"
    ):
        expand(tmp_path, mixer_extra="train = { lr = 0.1 }")


def test_section_sweep_and_seed_axes(tmp_path) -> None:
    specs, _ = expand(tmp_path, extra="seed = [0, 1]\nsweep = { task_options.power_a = [0.01, 1.0] }")
    att = [s.config for s in specs if s.config["mixer"] == "attention"]
    assert len(att) == 4 * 2 * 2
    assert {(c["seed"], c["task_options"]["power_a"]) for c in att} == {
        (0, 0.01),
        (0, 1.0),
        (1, 0.01),
        (1, 1.0),
    }
    assert all(c["axes"] == {"task_options.power_a": c["task_options"]["power_a"]} for c in att)


def test_short_conv_is_in_the_config_only_when_used(tmp_path) -> None:
    plain, _ = expand(tmp_path)
    assert all("short_conv" not in s.config for s in plain)
    conv, _ = expand(tmp_path, extra="short_conv = 3")
    assert all(s.config["short_conv"] == 3 for s in conv)
    swept, _ = expand(tmp_path, extra="sweep = { short_conv = [0, 4] }")
    assert sorted({s.config.get("short_conv", 0) for s in swept}) == [0, 4]
    with pytest.raises(ValueError, match="short_conv must be an int >= 0"):
        expand(tmp_path, extra="short_conv = -1")


def test_optional_unregistered_mixer_is_skipped_with_a_note(tmp_path) -> None:
    specs, notes = expand(tmp_path, more='\n[[mqar.mixers]]\nname = "not_a_mixer"\noptional = true\n')
    assert len(specs) == 8
    assert notes == ["tiny.toml [mqar]: skipped mixer 'not_a_mixer' (not registered)"]


@pytest.mark.parametrize(
    "extra, mixer_extra, more, match",
    [
        (
            "",
            "",
            '\n[[mqar.mixers]]\nname = "not_a_mixer"\n',
            r"unknown mixer 'not_a_mixer'; expected one of",
        ),
        ("", "colour = 1", "", r"unknown key\(s\) \['colour'\] in tiny.toml \[mqar\] mixers\[0\]"),
        (
            "",
            "",
            '\n[[mqar.mixers]]\nname = "attention"\nlabel = "a2"\noptions = { heads = 2 }\n',
            r"unknown config key\(s\) \['heads'\] for mixer 'attention'",
        ),
        ("", "", '\n[[mqar.mixers]]\nname = "attention"\nlabel = "linear"\n', "label 'linear' is used twice"),
        ('task = "nope"', "", "", r"unknown task 'nope'; expected one of"),
        ("epochs = 3", "", "", r"unknown key\(s\) \['epochs'\] in tiny.toml \[mqar\]"),
        (
            "sweep = { task_options.nope = [1, 2] }",
            "",
            "",
            r"unknown config key\(s\) \['nope'\] for task 'mqar'",
        ),
        ("sweep = { d_model = [1, 2] }", "", "", "sweep axis 'd_model' must start with task_options."),
        ("sweep = { train.epochs = 3 }", "", "", "sweep axis 'train.epochs' must be a non-empty list"),
        ("sweep = { train.lr = [1.0] }", "", "", "lr and seed are axes of their own"),
    ],
)
def test_config_errors_name_the_problem(
    tmp_path, extra: str, mixer_extra: str, more: str, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        expand(tmp_path, extra=extra, mixer_extra=mixer_extra, more=more)


@pytest.mark.parametrize(
    "old, new, match",
    [
        (
            "task_options = { vocab_size = 64 }",
            "task_options = { vocab = 64 }",
            r"unknown key\(s\) \['vocab'\] in tiny.toml \[mqar\] task_options",
        ),
        (
            "train = { epochs = 1, batch_size = 16 }",
            "train = { epochs = 1, lr = 0.1 }",
            r"unknown key\(s\) \['lr'\] in tiny.toml \[mqar\] train",
        ),
        ("train = { epochs = 1, batch_size = 16 }", "train = { epochs = 0 }", r"TrainConfig.epochs must be"),
        (
            "seq_len = 32, num_pairs = 4",
            "seq_len = 8, num_pairs = 4",
            r"test_sets\[1\]: MQARConfig.seq_len=8 must be",
        ),
        (
            "num_pairs = 2, num_examples = 32",
            "num_pairs = 2, num_examples = 0",
            r"num_examples must be a positive",
        ),
        (
            "seq_len = 32, num_pairs = 4, num_examples = 8",
            "seq_len = 32, num_pairs = 4, num_examples = 8, vocab_size = 128",
            "must share one vocab_size",
        ),
        ("lr = [1e-3, 3e-3]", "lr = []", r"lr must list at least one value"),
    ],
)
def test_value_errors_name_the_problem(tmp_path, old: str, new: str, match: str) -> None:
    path = tmp_path / "tiny.toml"
    text = TINY.replace("{extra}", "").replace("{mixer_extra}", "")
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ValueError, match=match):
        expand_suite(load_suite(path))


def test_set_names_do_not_depend_on_key_order() -> None:
    assert set_name({"num_pairs": 4, "num_examples": 9, "seq_len": 64}) == "L64 kv4"
    assert set_name({"seq_len": 64, "num_pairs": 4, "power_a": 1.0}) == "L64 kv4 power_a=1.0"
    assert set_name({"name": "hard", "seq_len": 64}) == "hard"


def test_a_real_run_measures_state_bytes_and_is_deterministic(tmp_path) -> None:
    specs, _ = expand(tmp_path)
    job = build_job("mqar")
    ctx = RunContext(device=torch.device("cpu"), progress=False)
    att = {k: v for k, v in specs[0].config.items() if k not in ("suite", "section", "job")}
    m1 = job.run(att, ctx)
    m2 = build_job("mqar").run(att, ctx)  # a fresh job: no data cache shared
    assert m1["accuracy"] == m2["accuracy"] and m1["final_loss"] == m2["final_loss"]
    assert set(m1["accuracy"]) == {"L16 kv2", "L32 kv4"}
    assert 0.0 <= m1["mean_accuracy"] <= 1.0
    # Attention's state is its KV cache: 2 layers x (k, v) x 2 heads x L x head_dim 8 x 4 bytes.
    assert m1["state_bytes"] == {"16": 2 * 2 * 2 * 16 * 8 * 4, "32": 2 * 2 * 2 * 32 * 8 * 4}
    assert [t["state_bytes"] for t in m1["tests"]] == [4096, 8192]
    assert m1["num_params"] == sum(p.numel() for p in _model(att).parameters())
    assert m1["steps"] == 2 and m1["train_tokens"] == 32 * 16
    assert m1["train_tokens_per_s"] > 0 and m1["peak_memory_bytes"] > 0
    assert m1["train_config"]["lr"] == 1e-3 and m1["train_config"]["epochs"] == 1
    # A recurrent mixer keeps the same state at both lengths.
    lin = next(s.config for s in specs if s.config["label"] == "linear")
    lin = {k: v for k, v in lin.items() if k not in ("suite", "section", "job")}
    ml = job.run(lin, ctx)
    assert ml["state_bytes"]["16"] == ml["state_bytes"]["32"] > 0


def _model(config: dict) -> torch.nn.Module:
    from memlab.models.lm import LM

    return LM.from_mixer(
        config["mixer"],
        vocab_size=64,
        d_model=config["d_model"],
        n_layers=config["n_layers"],
        **config["mixer_options"],
    )
