"""``memlab report`` from a store of synthetic MQAR runs: best-lr choice, frontier, files written."""

from __future__ import annotations

import pytest

from memlab.bench.jobs.mqar import best_lr_runs, line_key
from memlab.bench.report import format_bytes, format_value, pareto_front, write_report
from memlab.bench.store import Store

TESTS = [("L64 kv4", 64, 4), ("L128 kv8", 128, 8)]


def config(label: str, d_model: int, lr: float, axes: dict | None = None) -> dict:
    return {
        "suite": "demo",
        "section": "mqar",
        "job": "mqar",
        "label": label,
        "mixer": label,
        "mixer_options": {},
        "d_model": d_model,
        "n_layers": 2,
        "lr": lr,
        "seed": 0,
        "task": "mqar",
        "task_options": {"vocab_size": 256},
        "train": {"epochs": 2},
        "train_sets": [{"seq_len": 64, "num_pairs": 4, "num_examples": 100}],
        "test_sets": [{"seq_len": s, "num_pairs": p, "num_examples": 10} for _, s, p in TESTS],
        "axes": axes or {},
    }


def metrics(accs: list[float], state: dict[int, int]) -> dict:
    tests = [
        {
            "name": n,
            "seq_len": s,
            "num_pairs": p,
            "num_examples": 10,
            "accuracy": a,
            "best_accuracy": a,
            "state_bytes": state[s],
        }
        for (n, s, p), a in zip(TESTS, accs, strict=True)
    ]
    return {
        "accuracy": {t["name"]: t["accuracy"] for t in tests},
        "mean_accuracy": sum(accs) / len(accs),
        "tests": tests,
        "state_bytes": {str(k): v for k, v in state.items()},
        "num_params": 1000,
        "train_tokens_per_s": 5e4,
        "train_tokens": 6400,
        "train_wall_s": 1.0,
        "steps": 4,
        "epochs_run": 2,
        "stopped_early": False,
        "final_loss": 1.5,
        "peak_memory_bytes": 2**20,
        "wall_s": 1.2,
    }


RUNS = [
    # (label, d_model, lr, accuracies, state bytes at L=64 / L=128)
    ("attention", 32, 1e-3, [0.5, 0.4], {64: 32768, 128: 65536}),
    ("attention", 32, 3e-3, [0.99, 0.95], {64: 32768, 128: 65536}),
    ("attention", 64, 1e-3, [1.0, 1.0], {64: 65536, 128: 131072}),
    ("mamba", 32, 1e-3, [0.3, 0.1], {64: 4096, 128: 4096}),
    ("mamba", 64, 1e-3, [0.6, 0.2], {64: 8192, 128: 8192}),
]


@pytest.fixture
def store_path(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        for i, (label, d, lr, accs, state) in enumerate(RUNS):
            cfg = config(label, d, lr)
            store.claim(
                run_id=f"r{i}",
                suite="demo",
                section="mqar",
                job="mqar",
                name=f"{label} d={d} lr={lr}",
                config=cfg,
                seed=0,
                device="cpu",
                env={"git_sha": "abc", "device_name": "test cpu", "versions": {"torch": "2.x"}},
            )
            store.finish(f"r{i}", metrics(accs, state))
        store.claim(
            run_id="bad",
            suite="demo",
            section="mqar",
            job="mqar",
            name="gam d=32 lr=0.001",
            config=config("gam", 32, 1e-3),
            seed=0,
            device="cpu",
            env={},
        )
        store.fail("bad", "Traceback (most recent call last):\n  File x\nRuntimeError: out of <memory>\n")
    return path


def test_best_lr_is_chosen_by_mean_accuracy(store_path) -> None:
    with Store(store_path) as store:
        best = best_lr_runs(store.records())
    assert [(r.config["label"], r.config["d_model"], r.config["lr"]) for r in best] == [
        ("attention", 32, 3e-3),
        ("attention", 64, 1e-3),
        ("mamba", 32, 1e-3),
        ("mamba", 64, 1e-3),
    ]


def test_report_files_tables_and_failures(store_path, tmp_path) -> None:
    out = tmp_path / "report"
    paths = write_report(store_path, out)
    assert paths.index == out / "index.html" and paths.markdown == out / "results.md"
    names = sorted(p.name for p in paths.figures)
    assert names == ["demo_mqar_accuracy_vs_length.png", "demo_mqar_frontier.png", "demo_mqar_throughput.png"]
    for p in paths.figures:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = paths.markdown.read_text()
    # The best-lr table keeps attention d=32 at lr 0.003 (mean 0.97), not 0.001 (mean 0.45).
    assert "| attention | 32 | - | 0.003 | 0.970 | 0.990 | 0.950 | 32 KiB | 64 KiB | 1000 | 50,000 |" in md
    assert "| mamba | 64 | - | 0.001 | 0.400 | 0.600 | 0.200 | 8 KiB | 8 KiB |" in md
    assert "![recall-memory frontier](demo_mqar_frontier.png)" in md
    assert "gam d=32 lr=0.001 | failed | RuntimeError: out of <memory>" in md
    html = paths.index.read_text()
    assert "<img src='demo_mqar_frontier.png'" in html
    # Tracebacks are shown, escaped, in the HTML.
    assert "RuntimeError: out of &lt;memory&gt;" in html and "<memory>" not in html
    assert "test cpu" in md  # the environment section


def test_report_of_one_suite_and_errors(store_path, tmp_path) -> None:
    write_report(store_path, tmp_path / "r", suite="demo")
    with pytest.raises(ValueError, match=r"suite 'nope' has no runs .* it has \['demo'\]"):
        write_report(store_path, tmp_path / "r", suite="nope")
    with pytest.raises(ValueError, match="does not exist; run `memlab run SUITE` first"):
        write_report(tmp_path / "missing.sqlite", tmp_path / "r")


def test_pareto_front_and_formatting() -> None:
    pts = [(10.0, 0.5), (20.0, 0.4), (5.0, 0.1), (40.0, 0.9), (40.0, 0.7)]
    assert pareto_front(pts) == [(5.0, 0.1), (10.0, 0.5), (40.0, 0.9)]
    assert (
        format_bytes(512) == "512 B"
        and format_bytes(1536) == "1.5 KiB"
        and format_bytes(3 * 2**30) == "3 GiB"
    )
    assert format_value(0.123456) == "0.1235" and format_value(None) == "-" and format_value(True) == "yes"
    cfg = config("based", 64, 1e-3, axes={"mixer.feature_dim": 8, "task_options.vocab_size": 512})
    assert line_key(cfg) == "based feature_dim=8 vocab_size=512"
    assert line_key(cfg, mixer_axes=False) == "based vocab_size=512"
