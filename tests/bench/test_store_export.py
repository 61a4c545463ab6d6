"""benchmarks/store_export.py: runs of several stores merged by run id (a rerun replaces the earlier
row), diverged metrics kept, and the merged runs written back as a store that reads the same."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from memlab.bench.store import Store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store_export():
    spec = importlib.util.spec_from_file_location("store_export", ROOT / "benchmarks" / "store_export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fill(path: Path, runs: dict[str, dict], suite: str = "s") -> None:
    """One finished run per id, with these metrics."""
    with Store(path) as store:
        for run_id, metrics in runs.items():
            assert store.claim(run_id=run_id, suite=suite, section="sec", job="mqar", name=f"sec: {run_id}",
                               config={"label": run_id}, seed=0, device="cpu",
                               env={"device_name": "test device"})
            store.finish(run_id, metrics)


def test_later_store_replaces_a_rerun_and_keeps_the_rest(store_export, tmp_path: Path) -> None:
    old, new = tmp_path / "old.sqlite", tmp_path / "new.sqlite"
    fill(old, {"a": {"acc": 0.1}, "b": {"acc": 0.2}})
    fill(new, {"a": {"acc": 0.9}, "c": {"loss": float("nan")}})
    fill(new, {"x": {"acc": 1.0}}, suite="other")
    out = store_export.export([old, new], "s", "note")
    rows = {r["id"]: r for r in out["runs"]}
    assert set(rows) == {"a", "b", "c"}  # the other suite's run is left out
    assert rows["a"]["metrics"]["acc"] == 0.9 and rows["a"]["source"] == "new.sqlite"
    assert rows["b"]["metrics"]["acc"] == 0.2 and rows["b"]["source"] == "old.sqlite"
    assert rows["c"]["metrics"]["loss"] == "nan"  # JSON has no NaN literal: kept as the store keeps it
    assert out["device"] == "test device" and out["command"] == "note"
    json.dumps(out, allow_nan=False)  # strict JSON


def test_json_export_feeds_a_later_merge_and_a_store(store_export, tmp_path: Path) -> None:
    first, rerun = tmp_path / "first.sqlite", tmp_path / "rerun.sqlite"
    fill(first, {"a": {"acc": 0.1}, "b": {"acc": 0.2}})
    fill(rerun, {"b": {"acc": 0.7, "loss": float("inf")}})
    dump = tmp_path / "first.json"
    dump.write_text(json.dumps(store_export.export([first], "s", "")))
    merged = store_export.export([dump, rerun], "s", "")
    db = tmp_path / "merged.sqlite"
    store_export.write_store(json.loads(json.dumps(merged["runs"])), db)
    with Store(db) as store:
        got = {r.id: r for r in store.records(suite="s")}
    assert got["a"].metrics == {"acc": 0.1} and got["a"].status == "done"
    assert got["b"].metrics["acc"] == 0.7 and math.isinf(got["b"].metrics["loss"])
    assert got["b"].config == {"label": "b"}
    with pytest.raises(FileExistsError, match="merged.sqlite"):
        store_export.write_store(merged["runs"], db)


def test_missing_store_is_named(store_export, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.sqlite"):
        store_export.export([tmp_path / "nowhere.sqlite"], None, "")


def test_insert_refuses_a_run_id_already_held(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    fill(db, {"a": {"acc": 0.5}})
    with Store(db) as store:
        rec = store.get("a")
        with pytest.raises(ValueError, match="run 'a' is already in store"):
            store.insert([rec])
        assert store.get("a").metrics == {"acc": 0.5}
