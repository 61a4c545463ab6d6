"""Suite loading and expansion, resume, failures, interrupts and a SIGKILL mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import bench_fake_jobs  # noqa: F401 - registers the ``fake`` run kind
import pytest
import torch

from memlab.bench.jobs import Overrides
from memlab.bench.runner import expand_suite, load_suite, run_id, run_suite, select, suite_names
from memlab.bench.store import Store

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")


def write(tmp_path: Path, text: str, name: str = "suite.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def fake_suite(tmp_path: Path, runs: int = 4, extra: str = "") -> Path:
    return write(
        tmp_path,
        f"""
        [suite]
        description = "fake runs"

        [main]
        job = "fake"
        runs = {runs}
        {extra}
    """,
    )


def calls(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_shipped_suites_load_and_expand() -> None:
    assert {"quick", "mqar"} <= set(suite_names())
    quick, _ = expand_suite(load_suite("quick"))
    assert len(quick) >= 5
    mixers_in_quick = {s.config["mixer"] for s in quick if s.job == "mqar"}
    assert len(mixers_in_quick) >= 5, "quick must cover at least five mixers"
    assert any(s.job == "kv_niah" for s in quick), "quick has a KV-cache section"
    mqar, _ = expand_suite(load_suite("mqar"))
    d_models = {s.config["d_model"] for s in mqar}
    assert d_models == {64, 128, 256, 512}
    assert len({s.config["lr"] for s in mqar if s.config["mixer"] == "attention"}) == 4
    tests = {(t["seq_len"], t["num_pairs"]) for t in mqar[0].config["test_sets"]}
    assert (1024, 256) in tests and (64, 4) in tests
    assert mqar[0].config["task_options"]["vocab_size"] == 8192


def test_ids_are_stable_and_follow_the_config(tmp_path) -> None:
    path = fake_suite(tmp_path)
    a, _ = expand_suite(load_suite(path))
    b, _ = expand_suite(load_suite(path))
    assert [s.id for s in a] == [s.id for s in b]
    assert len({s.id for s in a}) == 4
    assert a[0].id == run_id(a[0].config)
    assert a[0].config["suite"] == "suite" and a[0].config["section"] == "main"
    c, _ = expand_suite(load_suite(path), Overrides(epochs=1))
    assert not {s.id for s in a} & {s.id for s in c}, "an override must give runs their own ids"
    assert [s.name for s in select(a, "#2")] == ["main: fake #2"]
    assert select(a, a[3].id[:8]) == [a[3]]
    assert [s.name for s in select(a, "#3, #1")] == ["main: fake #1", "main: fake #3"]


def test_failing_run_is_recorded_and_the_suite_goes_on_then_resume_skips_done(tmp_path, monkeypatch) -> None:
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("MEMLAB_TEST_CALLS", str(log))
    suite = load_suite(fake_suite(tmp_path, extra="fail = [1]"))
    with Store(tmp_path / "s.sqlite") as store:
        res = run_suite(suite, store, device=CPU, progress=False, log=lambda m: None)
        assert (res.done, res.failed, res.planned) == (3, 1, 4)
        assert calls(log) == [0, 1, 2, 3]
        failed = store.records(status="failed")
        assert len(failed) == 1 and failed[0].name == "main: fake #1"
        assert "RuntimeError: boom in run 1" in failed[0].error and "Traceback" in failed[0].error
        done = store.records(status="done")
        assert sorted(r.metrics["value"] for r in done) == [0.0, 4.0, 6.0]
        # Resume: done runs are skipped; the failed one is retried (and fails again) ...
        res = run_suite(suite, store, device=CPU, progress=False, log=lambda m: None)
        assert (res.done, res.failed, res.already_done) == (0, 1, 3)
        assert calls(log) == [0, 1, 2, 3, 1]
        # ... unless failed runs are to be kept.
        res = run_suite(suite, store, device=CPU, progress=False, retry_failed=False, log=lambda m: None)
        assert (res.done, res.failed, res.already_done) == (0, 0, 4)
        assert calls(log) == [0, 1, 2, 3, 1]
        assert store.get(failed[0].id).attempts == 2


def test_out_of_memory_is_a_failed_run_not_a_crash(tmp_path) -> None:
    suite = load_suite(fake_suite(tmp_path, runs=3, extra="oom = [0]"))
    with Store(tmp_path / "s.sqlite") as store:
        res = run_suite(suite, store, device=CPU, progress=False, log=lambda m: None)
        assert (res.done, res.failed) == (2, 1)
        (failed,) = store.records(status="failed")
        assert failed.name == "main: fake #0"
        assert failed.error_line == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 80.00 GiB"


def test_cpu_threads_from_the_suite_or_the_caller(tmp_path) -> None:
    before = torch.get_num_threads()
    try:
        path = write(tmp_path, "[suite]\ncpu_threads = 1\n[main]\njob = 'fake'\nruns = 1\n")
        suite = load_suite(path)
        assert suite.cpu_threads == 1
        with Store(tmp_path / "s.sqlite") as store:
            run_suite(suite, store, device=CPU, progress=False, log=lambda m: None)
            assert torch.get_num_threads() == 1
            assert "1 torch thread)" in store.records()[0].env["device_name"]
            store.delete([r.id for r in store.records()])
            run_suite(suite, store, device=CPU, threads=2, progress=False, log=lambda m: None)
            assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="cpu_threads must be a positive int, got 0"):
            load_suite(write(tmp_path, "[suite]\ncpu_threads = 0\n[main]\njob = 'fake'\nruns = 1\n"))
    finally:
        torch.set_num_threads(before)


def test_limit_and_filter(tmp_path, monkeypatch) -> None:
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("MEMLAB_TEST_CALLS", str(log))
    suite = load_suite(fake_suite(tmp_path, runs=5))
    with Store(tmp_path / "s.sqlite") as store:
        run_suite(suite, store, device=CPU, limit=2, progress=False, log=lambda m: None)
        assert calls(log) == [0, 1]
        run_suite(suite, store, device=CPU, pattern="#4", progress=False, log=lambda m: None)
        assert calls(log) == [0, 1, 4]
        run_suite(suite, store, device=CPU, limit=1, progress=False, log=lambda m: None)
        assert calls(log) == [0, 1, 4, 2], "limit counts runs started, not runs skipped as done"


def test_stop_after_starts_no_run_once_the_time_is_spent(tmp_path, monkeypatch) -> None:
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("MEMLAB_TEST_CALLS", str(log))
    suite = load_suite(fake_suite(tmp_path, runs=4))
    # A clock that advances 10 s per reading: runs start at t = 10, 20 (< 25), not at 30.
    clock = iter(range(0, 10**6, 10))
    monkeypatch.setattr("memlab.bench.runner.time.perf_counter", lambda: float(next(clock)))
    with Store(tmp_path / "s.sqlite") as store:
        res = run_suite(suite, store, device=CPU, stop_after=25, progress=False, log=lambda m: None)
        assert res.stopped_by_time and res.done == len(calls(log)) >= 1
        assert len(store.records(status="done")) == res.done < 4
        monkeypatch.undo()
        monkeypatch.setenv("MEMLAB_TEST_CALLS", str(log))
        res = run_suite(suite, store, device=CPU, stop_after=1e9, progress=False, log=lambda m: None)
        assert not res.stopped_by_time and sorted(calls(log)) == [0, 1, 2, 3]
        with pytest.raises(ValueError, match="stop_after"):
            run_suite(suite, store, device=CPU, stop_after=-1, log=lambda m: None)


def test_ranks_share_the_suite_without_overlap(tmp_path, monkeypatch) -> None:
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("MEMLAB_TEST_CALLS", str(log))
    suite = load_suite(fake_suite(tmp_path, runs=5))
    with Store(tmp_path / "s.sqlite") as store:
        run_suite(suite, store, device=CPU, rank=1, world_size=2, progress=False, log=lambda m: None)
        assert calls(log) == [1, 3]
        run_suite(suite, store, device=CPU, rank=0, world_size=2, progress=False, log=lambda m: None)
        assert sorted(calls(log)) == [0, 1, 2, 3, 4]
        with pytest.raises(ValueError, match="rank"):
            run_suite(suite, store, device=CPU, rank=2, world_size=2, log=lambda m: None)


def test_ctrl_c_marks_the_run_interrupted_and_it_runs_again(tmp_path) -> None:
    path = fake_suite(tmp_path, runs=3, extra="interrupt = [1]")
    suite = load_suite(path)
    with Store(tmp_path / "s.sqlite") as store:
        with pytest.raises(KeyboardInterrupt):
            run_suite(suite, store, device=CPU, progress=False, log=lambda m: None)
        status = {r.name: r.status for r in store.records()}
        assert status == {"main: fake #0": "done", "main: fake #1": "interrupted"}
        assert store.integrity_check() == "ok"
        with pytest.raises(KeyboardInterrupt):  # the same run is attempted again first
            run_suite(suite, store, device=CPU, progress=False, log=lambda m: None)
        assert store.get(store.records()[1].id).attempts == 2


def test_sigkill_mid_run_leaves_a_consistent_store_that_resumes(tmp_path, monkeypatch) -> None:
    suite_path = fake_suite(tmp_path, runs=4, extra="hang = 2")
    db = tmp_path / "s.sqlite"
    hang = tmp_path / "hanging"
    log = tmp_path / "calls.txt"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        import bench_fake_jobs
        from memlab.cli import main
        args = ["run", {str(suite_path)!r}, "--store", {str(db)!r}, "--device", "cpu", "--no-progress"]
        sys.exit(main(args))
    """)
    env = {**os.environ, "MEMLAB_TEST_HANG": str(hang), "MEMLAB_TEST_CALLS": str(log)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while not hang.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert calls(log) == [0, 1, 2]

    with Store(db) as store:
        assert store.integrity_check() == "ok"
        status = {r.name: r.status for r in store.records()}
        assert status == {"main: fake #0": "done", "main: fake #1": "done", "main: fake #2": "running"}
        killed = next(r for r in store.records() if r.status == "running")
        assert store.is_stale(killed)
        # Resume in this process (no hang now): only the killed run and the one never started run.
        monkeypatch.setenv("MEMLAB_TEST_CALLS", str(log))
        res = run_suite(load_suite(suite_path), store, device=CPU, progress=False, log=lambda m: None)
        assert (res.done, res.already_done, res.failed) == (2, 2, 0)
        assert calls(log) == [0, 1, 2, 2, 3]
        assert {r.status for r in store.records()} == {"done"}
        assert store.get(killed.id).attempts == 2
        assert store.integrity_check() == "ok"


@pytest.mark.parametrize(
    "text, match",
    [
        ("[suite]\ncolour = 'red'\n[a]\njob = 'fake'\nruns = 1\n", r"unknown key\(s\) \['colour'\]"),
        ("[a]\nruns = 1\n", "a section needs job"),
        ("[a]\njob = 'nope'\n", "unknown job kind 'nope'"),
        ("[a]\njob = 'fake'\nruns = 1\nextra = 2\n", r"unknown key\(s\) \['extra'\] in suite.toml \[a\]"),
        ("[a\njob = 'fake'\n", "not valid TOML"),
        ("title = 'x'\n", "top-level key 'title' must be a section table"),
        ("[suite]\ndescription = 'empty'\n", "has no sections"),
    ],
)
def test_bad_suites_name_the_problem(tmp_path, text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expand_suite(load_suite(write(tmp_path, text)))


def test_unknown_suite_lists_the_known_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown suite 'nosuch'; expected one of \[.*'quick'"):
        load_suite("nosuch")
    with pytest.raises(ValueError, match="does not exist"):
        load_suite(str(tmp_path / "missing.toml"))
