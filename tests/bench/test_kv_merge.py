"""benchmarks/kv_merge.py: several kv.py processes' JSON merged into one report without losing or
mixing anything (accuracy entries keep their run, speed rows of one length come from one run)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kv_merge():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("kv_merge", ROOT / "benchmarks" / "kv_merge.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def entry(policy: str, em: float, ratio: float | None = None) -> dict:
    out = {"policy": policy, "label": policy, "n": 10, "em": em, "em_se": 0.1, "loglik": -1.0,
           "kv_fraction": ratio or 1.0, "attended_ratio": 1.0}
    return out | ({"ratio": ratio} if ratio else {})


def report(device: str, points: dict, speed: dict | None = None) -> dict:
    return {"command": f"kv.py on {device}", "date": "2026-12-05T00:00:00", "device": device,
            "dtype": "bf16", "versions": {"torch": "x"}, "ratios": [0.5, 0.25, 0.1],
            "accuracy": {"points": points, "limits": {}}, "speed": speed or {}}


def speed_row(length: int, decode_ms: float) -> dict:
    return {"policy": "full", "length": length, "prefill_s": 0.1, "decode_ms": decode_ms,
            "kv_bytes": 100, "full_kv_bytes": 100, "kv_fraction": 1.0, "peak_bytes": 10,
            "attended_ratio": 1.0}


def test_union_of_policies_with_their_runs(kv_merge) -> None:
    a = report("A", {"2048/agnostic": {"seconds": 5.0, "partial": True, "policies": {
        "full": entry("full", 0.9), "streaming@0.5": entry("streaming", 0.5, 0.5)}}})
    b = report("B", {"2048/agnostic": {"seconds": 7.0, "policies": {
        "full": entry("full", 0.9), "duo@0.5": entry("duo", 1.0, 0.5)}},
        "1024/aware": {"seconds": 1.0, "policies": {"full": entry("full", 1.0)}}})
    merged = kv_merge.merge([("a.json", a), ("b.json", b)])
    point = merged["accuracy"]["points"]["2048/agnostic"]
    assert list(point["policies"]) == ["full", "streaming@0.5", "duo@0.5"]  # registry order
    assert point["policies"]["streaming@0.5"]["run"] == 0
    assert point["policies"]["duo@0.5"]["run"] == 1
    assert point["policies"]["full"]["run"] == 1  # the later file wins a clash
    assert point["seconds"] == 12.0 and point["runs"] == [0, 1]
    # Everything the grid expects and nobody measured is listed, so the report can say so.
    assert point["partial"] and "alisa@0.25" in point["missing"] and "duo@0.5" not in point["missing"]
    assert list(merged["accuracy"]["points"]) == ["1024/aware", "2048/agnostic"]  # by length
    assert [r["source"] for r in merged["runs"]] == ["a.json", "b.json"]
    assert merged["device"] == "A / B"


def test_a_clash_keeps_the_entry_with_more_prompts(kv_merge) -> None:
    many = entry("full", 0.74) | {"n": 50}
    few = entry("full", 1.0)  # n = 10: a partial run that stopped after its first batch
    a = report("A", {"4096/agnostic": {"seconds": 5.0, "policies": {"full": many}}})
    b = report("B", {"4096/agnostic": {"seconds": 7.0, "partial": True, "policies": {
        "full": few, "alisa@0.5": entry("alisa", 0.2, 0.5)}}})
    point = kv_merge.merge([("a.json", a), ("b.json", b)])["accuracy"]["points"]["4096/agnostic"]
    assert point["policies"]["full"]["n"] == 50 and point["policies"]["full"]["run"] == 0
    assert point["policies"]["alisa@0.5"]["run"] == 1
    # ... whichever file comes first
    point = kv_merge.merge([("b.json", b), ("a.json", a)])["accuracy"]["points"]["4096/agnostic"]
    assert point["policies"]["full"]["n"] == 50 and point["policies"]["full"]["run"] == 1


def test_with_as_many_prompts_a_gpu_entry_beats_a_cpu_one(kv_merge) -> None:
    gpu = report("NVIDIA H100 80GB HBM3", {"2048/agnostic": {"seconds": 5.0, "policies": {
        "full": entry("full", 0.98) | {"n": 50}}}})
    cpu = report("AMD EPYC (2 cores, 2 torch threads)", {"2048/agnostic": {"seconds": 7.0, "policies": {
        "full": entry("full", 1.0) | {"n": 50}, "alisa@0.5": entry("alisa", 0.3, 0.5) | {"n": 50}}}})
    for order in ([("gpu", gpu), ("cpu", cpu)], [("cpu", cpu), ("gpu", gpu)]):
        point = kv_merge.merge(order)["accuracy"]["points"]["2048/agnostic"]["policies"]
        assert point["full"]["em"] == 0.98  # the GPU's, whichever file is later
        assert point["alisa@0.5"]["em"] == 0.3  # measured only on the CPU: kept
    more = report("AMD EPYC", {"2048/agnostic": {"seconds": 9.0, "policies": {
        "full": entry("full", 0.5) | {"n": 60}}}})
    point = kv_merge.merge([("gpu", gpu), ("more", more)])["accuracy"]["points"]["2048/agnostic"]
    assert point["policies"]["full"]["n"] == 60  # more prompts still come first


def test_speed_rows_of_one_length_come_from_one_run(kv_merge) -> None:
    old = report("A", {}, {"full@1/L=8192": speed_row(8192, 50.0), "snapkv@0.1/L=8192": speed_row(8192, 45.0),
                           "full@1/L=16384": speed_row(16384, 52.0),
                           "h2o@0.1/L=16384": speed_row(16384, 60.0)})
    new = report("B", {}, {"full@1/L=8192": speed_row(8192, 39.0),
                           "h2o@0.1/L=16384": {"skipped": "time budget"},
                           "full@1/L=65536": speed_row(65536, 70.0)})
    third = report("C", {}, {"h2o@0.1/L=8192": speed_row(8192, 41.0)})  # no anchor: never adopted
    merged = kv_merge.merge([("old", old), ("new", new), ("third", third)])
    assert merged["speed_runs"] == {"8192": 1, "16384": 0, "65536": 1}
    # 8k from the newer run only: the older run's SnapKV row at 8k is not mixed in
    assert set(merged["speed"]) == {"full@1/L=8192", "full@1/L=16384", "h2o@0.1/L=16384", "full@1/L=65536"}
    assert merged["speed"]["full@1/L=8192"] == {**speed_row(8192, 39.0), "run": 1}
    # 16k: the newer run never timed the full cache there, so all of 16k stays the older run's
    assert merged["speed"]["h2o@0.1/L=16384"]["decode_ms"] == 60.0
    assert merged["speed"]["h2o@0.1/L=16384"]["run"] == 0
    assert set(merged["speed_earlier"]) == {"2"}


def test_cli_writes_report_and_rejects_missing_input(kv_merge, tmp_path: Path) -> None:
    src = tmp_path / "a.json"
    src.write_text(json.dumps(report("A", {"1024/agnostic": {"seconds": 1.0, "policies": {
        "full": entry("full", 1.0), "snapkv@0.5": entry("snapkv", 0.2, 0.5)}}})))
    out = tmp_path / "out"
    assert kv_merge.main(["--out", str(out), str(src)]) == 0
    merged = json.loads((out / "kv.json").read_text())
    assert merged["accuracy"]["points"]["1024/agnostic"]["policies"]["snapkv@0.5"]["em"] == 0.2
    assert "| snapkv@0.5 | 10 | 0.20" in (out / "kv.md").read_text()
    with pytest.raises(SystemExit, match="nope.json is not a file"):
        kv_merge.main(["--out", str(out), str(tmp_path / "nope.json")])
