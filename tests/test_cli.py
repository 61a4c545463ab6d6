"""The ``memlab`` command: list, run (quick, two runs, one epoch), report, and its errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from memlab.bench.store import Store
from memlab.cli import main


def test_list_shows_mixers_tasks_kinds_and_suites(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in (
        "attention",
        "sliding_window",
        "grows with T",
        "mqar",
        "vocab_size=8192",
        "quick",
        "run kinds",
    ):
        assert word in out, word


@pytest.fixture
def keep_threads():
    # `memlab run quick` sets torch's thread count (the suite's cpu_threads); later tests in this
    # process must not inherit it.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_run_quick_twice_then_report(tmp_path, capsys, keep_threads) -> None:
    store = tmp_path / "memlab.sqlite"
    # One epoch on at most 128 examples per set: the whole path (train, measure, store) in seconds.
    small = ["--epochs", "1", "--max-examples", "128"]
    args = ["run", "quick", "--limit", "2", *small, "--store", str(store), "--device", "cpu"]
    assert main([*args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 runs done, 0 failed" in out
    assert "best learning rate per (mixer, d_model)" in out  # the summary table
    with Store(store) as s:
        done = s.records(status="done")
        assert len(done) == 2 and all(r.config["train"]["epochs"] == 1 for r in done)
        assert all(
            s["num_examples"] <= 128 for r in done for s in r.config["train_sets"] + r.config["test_sets"]
        )
        assert all(r.env["versions"]["torch"] and r.device == "cpu" for r in done)
        assert all(0 <= r.metrics["mean_accuracy"] <= 1 and r.metrics["state_bytes"] for r in done)
    # Resume: the same two are done; --limit 0 runs nothing and reports them as already done.
    assert main([*args, "--no-progress", "--limit", "0"]) == 0
    assert "0 runs done, 0 failed, 0 already done" in capsys.readouterr().out
    assert main(["run", "quick", *small, "--store", str(store), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("done") >= 2 and "pending" in listing

    out_dir = tmp_path / "report"
    assert main(["report", "--store", str(store), "--out", str(out_dir)]) == 0
    assert (out_dir / "index.html").is_file() and (out_dir / "results.md").is_file()
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert pngs == [
        "quick_mqar_accuracy_vs_length.png",
        "quick_mqar_frontier.png",
        "quick_mqar_throughput.png",
    ]
    assert "Best learning rate per (mixer, d_model)" in (out_dir / "results.md").read_text()


def test_errors_name_the_problem_and_exit_2(tmp_path, capsys) -> None:
    assert main(["run", "nosuch", "--store", str(tmp_path / "s.sqlite")]) == 2
    assert "unknown suite 'nosuch'; expected one of" in capsys.readouterr().out
    assert main(["run", "quick", "--device", "tpu", "--store", str(tmp_path / "s.sqlite")]) == 2
    assert "got 'tpu'" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[mqar]\njob = "mqar"\nd_model = [16]\nlr = [1e-3]\ntrain_sets = []\ntest_sets = []\n'
        'mixers = [{ name = "no_such_mixer" }]\n'
    )
    assert main(["run", str(bad), "--store", str(tmp_path / "s.sqlite")]) == 2
    assert "train_sets must be a non-empty list" in capsys.readouterr().out
    assert main(["report", "--store", str(tmp_path / "none.sqlite")]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_python_dash_m_memlab() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "memlab", "--help"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "run" in res.stdout and "report" in res.stdout and "list" in res.stdout


def test_kv_and_calibrate_subcommands_are_wired(tmp_path, capsys) -> None:
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    assert main(["kv", "generate", "--policy", "nope", "--prompt-file", str(prompt)]) == 2
    assert "unknown kv policy 'nope'" in capsys.readouterr().out
    try:
        main(["calibrate", "duo", "--help"])
    except SystemExit as exc:  # argparse exits 0 after printing help
        assert exc.code == 0
    assert "--steps" in capsys.readouterr().out
