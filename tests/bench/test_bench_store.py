"""The SQLite store: status transitions, stale-run detection, consistency."""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys

import pytest

from memlab.bench.store import Store


def claim(store: Store, run_id: str = "r1", **kw) -> bool:
    args = dict(
        run_id=run_id,
        suite="s",
        section="sec",
        job="fake",
        name=f"run {run_id}",
        config={"a": 1},
        seed=0,
        device="cpu",
        env={"git_sha": "abc"},
    )
    args.update(kw)
    return store.claim(**args)


def test_transitions_and_json_roundtrip(tmp_path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        assert claim(store)
        rec = store.get("r1")
        assert rec.status == "running" and rec.pid == os.getpid() and rec.attempts == 1
        assert rec.config == {"a": 1} and rec.env == {"git_sha": "abc"}
        store.finish("r1", {"acc": 0.5, "loss": float("nan"), "nested": {"x": [1, float("inf")]}})
        rec = store.get("r1")
        assert rec.status == "done" and rec.metrics["acc"] == 0.5
        assert math.isnan(rec.metrics["loss"]) and rec.metrics["nested"]["x"] == [1, math.inf]
        assert rec.wall_s is not None and rec.wall_s >= 0
        # A done run is never claimed again, even with retry.
        assert not claim(store)
        with pytest.raises(RuntimeError, match="not running"):
            store.finish("r1", {})
        assert store.integrity_check() == "ok"


def test_failed_runs_keep_their_error_and_retry_is_optional(tmp_path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        assert claim(store)
        store.fail("r1", "Traceback ...\nRuntimeError: boom\n")
        rec = store.get("r1")
        assert rec.status == "failed" and rec.error_line == "RuntimeError: boom"
        assert not claim(store, retry_failed=False)
        assert claim(store, retry_failed=True)
        rec = store.get("r1")
        assert rec.status == "running" and rec.attempts == 2 and rec.error is None


def test_interrupted_runs_are_claimed_again(tmp_path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        assert claim(store)
        store.fail("r1", "KeyboardInterrupt", interrupted=True)
        assert store.get("r1").status == "interrupted"
        assert claim(store, retry_failed=False)  # interrupted is not a failure


def test_running_row_of_a_dead_process_is_stale_but_a_live_one_is_not(tmp_path) -> None:
    path = tmp_path / "s.sqlite"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with Store(path) as store:
            assert claim(store)
            # Pretend the row belongs to the live child process.
            conn = sqlite3.connect(path)
            conn.execute("UPDATE runs SET pid = ? WHERE id = 'r1'", (child.pid,))
            conn.commit()
            assert not store.is_stale(store.get("r1"))
            assert not claim(store), "a run owned by a live process must not be taken over"
            child.kill()
            child.wait()
            assert store.is_stale(store.get("r1"))
            assert claim(store)
            assert store.get("r1").pid == os.getpid()
            conn.close()
    finally:
        if child.poll() is None:
            child.kill()


def test_records_filter_and_errors(tmp_path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        claim(store, "a")
        claim(store, "b", suite="other")
        store.finish("a", {"v": 1})
        assert [r.id for r in store.records()] == ["a", "b"]
        assert [r.id for r in store.records(suite="other")] == ["b"]
        assert [r.id for r in store.records(status="done")] == ["a"]
        assert store.suites() == ["other", "s"]
        with pytest.raises(ValueError, match="status must be one of"):
            store.records(status="finished")
        assert store.delete(["a", "zzz"]) == 1
        assert store.get("a") is None
    with pytest.raises(ValueError, match="is a directory"):
        Store(tmp_path)


def test_wal_mode_and_schema_version(tmp_path) -> None:
    path = tmp_path / "s.sqlite"
    Store(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="schema version 99"):
        Store(path)
