"""`memlab run` / `memlab report` on tiny real suites written to tmp_path: resume, dry-run status,
other data layouts, and bad inputs that must exit 2 with a message (never a traceback)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from memlab.bench.store import Store
from memlab.cli import main

MQAR = """
[suite]
cpu_threads = 1

[m]
job = "mqar"
d_model = [16]
lr = [1e-3, 3e-3]
task_options = { vocab_size = 18 }
train = { epochs = 1, batch_size = 8 }
train_sets = [ { seq_len = 17, num_pairs = 2, num_examples = 16 } ]
test_sets = [
    { seq_len = 17, num_pairs = 2, num_examples = 8 },
    { seq_len = 33, num_pairs = 8, num_examples = 4 },
]
[[m.mixers]]
name = "attention"
options = { n_heads = 1 }
"""


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def write(tmp_path, text: str, name: str = "tiny.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_tiny_mqar_suite_runs_resumes_and_reports(tmp_path, capsys) -> None:
    suite = write(tmp_path, MQAR)
    store = tmp_path / "s.sqlite"
    args = ["run", str(suite), "--store", str(store), "--device", "cpu", "--no-progress"]
    assert main([*args, "--limit", "1"]) == 0
    assert "1 runs done, 0 failed, 0 already done of 2" in capsys.readouterr().out
    assert main([*args, "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("pending") == 1 and listing.count("done") == 1
    assert main(args) == 0
    assert "1 runs done, 0 failed, 1 already done of 2" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 runs done, 0 failed, 2 already done of 2" in capsys.readouterr().out
    with Store(store) as s:
        done = s.records(status="done")
        assert len(done) == 2 and {r.config["lr"] for r in done} == {1e-3, 3e-3}
        for r in done:
            assert set(r.metrics["accuracy"]) == {"L17 kv2", "L33 kv8"}
            assert all(0.0 <= a <= 1.0 for a in r.metrics["accuracy"].values())
            assert set(r.metrics["state_bytes"]) == {"17", "33"}
            # Attention's state is its KV cache: it grows with the prefill length.
            assert r.metrics["state_bytes"]["33"] > r.metrics["state_bytes"]["17"] > 0
            assert r.metrics["epochs_run"] == 1 and r.metrics["steps"] == 2
    out = tmp_path / "rep"
    assert main(["report", "--store", str(store), "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert "2 finished runs of 2" in md and "L33 kv8" in md


def test_passkey_suite_with_lengths_from_task_options(tmp_path, capsys) -> None:
    # Every set takes its length from task_options: the sets' own tables hold only their size.
    text = """
    [p]
    job = "passkey"
    d_model = [16]
    lr = [1e-3]
    task_options = { seq_len = 24, key_len = 2, n_digits = 4, filler_vocab = 4 }
    train = { epochs = 1, batch_size = 8 }
    measure = { decode_steps = 1, decode_warmup = 0, depth_bins = 2 }
    train_sets = [ { num_examples = 8 } ]
    test_sets = [ { num_examples = 4 } ]
    [[p.mixers]]
    name = "attention"
    options = { n_heads = 1 }
    """
    store = tmp_path / "s.sqlite"
    args = ["run", str(write(tmp_path, text)), "--store", str(store), "--device", "cpu", "--no-progress"]
    assert main([*args, "--strict"]) == 0, capsys.readouterr().out
    with Store(store) as s:
        (rec,) = s.records()
        assert rec.status == "done", rec.error
        (test,) = rec.metrics["tests"]
        assert test["seq_len"] == 24 and test["train_length"] is True and test["key_len"] == 2


@pytest.mark.parametrize(
    "old,new,words",
    [
        ('job = "mqar"', 'job = "mqar"\nwhatever = 1', ["unknown key(s) ['whatever']"]),
        ('name = "attention"', 'name = "nope_mixer"', ["unknown mixer 'nope_mixer'"]),
        ('job = "mqar"', 'job = "mqar"\ntask = "nope_task"', ["unknown task 'nope_task'"]),
        ("d_model = [16]", "d_model = []", ["d_model must list at least one value"]),
        ("vocab_size = 18", "vocab_size = 3", ["vocab_size=3"]),
        ("cpu_threads = 1", "cpu_threads = 0", ["cpu_threads"]),
        ("cpu_threads = 1", "cpu_thread = 1", ["['cpu_thread']"]),
        ('job = "mqar"', 'job = "mqar2"', ["unknown job kind 'mqar2'"]),
        ("[m]", "[m", ["not valid TOML"]),
    ],
)
def test_bad_suites_exit_2_with_the_problem_named(tmp_path, capsys, old, new, words) -> None:
    assert old in MQAR
    suite = write(tmp_path, MQAR.replace(old, new))
    store = tmp_path / "s.sqlite"
    for extra in ([], ["--dry-run"]):
        assert main(["run", str(suite), "--store", str(store), "--device", "cpu", *extra]) == 2
        out = capsys.readouterr().out
        assert "error:" in out and "Traceback" not in out
        for w in words:
            assert w in out.replace("\n", ""), (w, out)
    assert not store.exists() or Store(store).records() == []


def test_filter_matching_nothing_and_limit_zero(tmp_path, capsys) -> None:
    suite = write(tmp_path, MQAR)
    store = tmp_path / "s.sqlite"
    base = ["run", str(suite), "--store", str(store), "--device", "cpu", "--no-progress"]
    assert main([*base, "--filter", "mamba"]) == 2
    out = capsys.readouterr().out
    assert "'mamba'" in out and "matches none of the 2 runs" in out
    assert main([*base, "--limit", "0"]) == 0
    assert "0 runs done, 0 failed, 0 already done of 2" in capsys.readouterr().out
    assert main([*base, "--filter", "lr=0.003", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "1 runs" in listing and "lr=0.003" in listing


def test_report_errors_exit_2(tmp_path, capsys) -> None:
    assert main(["report", "--store", str(tmp_path / "missing.sqlite")]) == 2
    assert "does not exist" in capsys.readouterr().out
    store = tmp_path / "s.sqlite"
    Store(store).close()
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "r"), "--suite", "tiny"]) == 2
    assert "suite 'tiny' has no runs" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra", [["--limit", "-1"], ["--stop-after", "-5"], ["--threads", "0"], ["--epochs", "0"]]
)
def test_bad_numbers_are_usage_errors(tmp_path, capsys, extra: list[str]) -> None:
    suite = write(tmp_path, MQAR)
    with pytest.raises(SystemExit) as info:
        main(["run", str(suite), "--store", str(tmp_path / "s.sqlite"), *extra])
    assert info.value.code == 2
    assert extra[0] in capsys.readouterr().err
