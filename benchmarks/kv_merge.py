"""Merge the kv.json files of several `benchmarks/kv.py` processes into one report.

The H200/H100 calls run kv.py as several processes (one accuracy point each, speed alone), and a
point may be measured across calls (some policies in one, the rest in another). This keeps every
measured entry, says which run measured it (device, date, command), lists what each point still
misses, and writes the merged kv.json, kv.md and plots with kv.py's own writers.

    python benchmarks/kv_merge.py --out DIR A/kv.json B/kv.json ...

On a clash (one policy at one point measured twice) the entry with more prompts wins; with as
many, a GPU run's (bf16, the grid's device) beats a CPU run's (fp32, stand-ins measured when no
device time was left); then the later file's.

Speed rows are never mixed across runs within one context length (a row's ratio to the anchor is
only meaningful within one process): for each length, the last run that timed the full cache there
gives every row of that length, each tagged with its run (``speed_runs`` maps length to run).
Earlier runs' speed sections stay whole under ``speed_earlier``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv import CLAIMS, claims, plots, specs_for, write_markdown  # noqa: E402

from memlab.bench.jobs.kv_niah import spec_key  # noqa: E402


def expected_keys(ratios: list[float]) -> list[str]:
    """The accuracy entries a complete point holds (policy@ratio, as kv.py names them)."""
    return [spec_key(spec) for spec in specs_for(ratios, smoke=False)]


def run_info(report: dict[str, Any], source: str) -> dict[str, Any]:
    return {k: report.get(k) for k in ("command", "date", "device", "dtype", "versions", "seconds")} | {
        "source": source
    }


def on_gpu(report: dict[str, Any]) -> bool:
    """Whether a kv.json was measured on a GPU (its device name), not on the CPU."""
    return any(word in str(report.get("device", "")) for word in ("NVIDIA", "GPU", "AMD Instinct"))


def merge(reports: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """``reports``: (source name, kv.json contents), oldest first."""
    runs = [run_info(r, src) for src, r in reports]
    points: dict[str, dict[str, Any]] = {}
    limits: dict[str, Any] = {}
    speeds: list[tuple[int, dict[str, Any]]] = []
    merged: dict[str, Any] = {"benchmark": "kv", "runs": runs}
    for i, (_, rep) in enumerate(reports):
        for key in ("correctness", "duo_gates", "ratios", "ratio_meaning"):
            if key in rep:
                merged[key] = rep[key]
        acc = rep.get("accuracy", {})
        for point, entry in acc.get("points", {}).items():
            if "policies" not in entry:
                continue
            dest = points.setdefault(point, {"policies": {}, "seconds": 0.0, "runs": []})
            dest["seconds"] = round(dest["seconds"] + entry.get("seconds", 0.0), 1)
            dest["runs"].append(i)
            for key, m in entry["policies"].items():
                # On a clash the entry measured on more prompts wins (a partial run's few prompts
                # must not replace a complete one's); with as many, a GPU run's beats a CPU
                # stand-in's, then the later one's.
                held = dest["policies"].get(key)
                mine = (m.get("n", 0), on_gpu(rep))
                if held is None or mine >= (held.get("n", 0), on_gpu(reports[held["run"]][1])):
                    dest["policies"][key] = {**m, "run": i}
        for key, m in acc.get("limits", {}).items():
            limits[key] = {**m, "run": i}
        if any("prefill_s" in v for v in rep.get("speed", {}).values()):
            speeds.append((i, rep["speed"]))
    want = expected_keys(merged.get("ratios", [0.5, 0.25, 0.1]))
    for entry in points.values():
        missing = [k for k in want if k not in entry["policies"]]
        entry["missing"] = missing
        entry["partial"] = bool(missing)
        # Order as kv.py does (full first, policies in registry order), whatever the merge order.
        entry["policies"] = {k: entry["policies"][k] for k in want if k in entry["policies"]} | {
            k: v for k, v in entry["policies"].items() if k not in want
        }
    merged["accuracy"] = {"points": dict(sorted(points.items(), key=_point_order)), "limits": limits}
    if speeds:
        merged["speed_runs"], merged["speed"] = speed_by_length(speeds)
        used = set(merged["speed_runs"].values())
        merged["speed_earlier"] = {str(i): s for i, s in speeds if i not in used}
    devices = sorted({str(r["device"]) for r in runs})
    merged.update(
        command="; ".join(str(r["command"]) for r in runs),
        date=", ".join(sorted({str(r["date"])[:10] for r in runs})),
        device=" / ".join(devices),
        versions=runs[-1]["versions"],
    )
    merged["claims"] = claims(merged)
    merged["paper_claims"] = CLAIMS
    return merged


def _length_of(key: str) -> int:
    return int(key.rpartition("/L=")[2])


def speed_by_length(speeds: list[tuple[int, dict[str, Any]]]) -> tuple[dict[str, int], dict[str, Any]]:
    """Per context length, all rows of the last run that timed the full cache at that length.

    ``speeds``: (run index, kv.py speed section), oldest first. Returns ({length: run}, rows).
    """
    chosen: dict[int, int] = {}
    for i, section in speeds:
        for key, row in section.items():
            if key.startswith("full@1/") and "decode_ms" in row:
                chosen[_length_of(key)] = i
    by_run = dict(speeds)
    rows: dict[str, Any] = {}
    for length, i in sorted(chosen.items()):
        rows |= {k: {**v, "run": i} for k, v in by_run[i].items() if _length_of(k) == length}
    return {str(length): i for length, i in sorted(chosen.items())}, rows


def _point_order(item: tuple[str, Any]) -> tuple[int, str]:
    length, _, mode = item[0].partition("/")
    return (int(length) if length.isdigit() else 0, mode)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("inputs", type=Path, nargs="+", help="kv.json files, oldest first")
    args = ap.parse_args(argv)
    reports = []
    for path in args.inputs:
        if not path.is_file():
            raise SystemExit(f"inputs: {path} is not a file; expected a kv.json written by benchmarks/kv.py")
        reports.append((str(path), json.loads(path.read_text())))
    merged = merge(reports)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv.json").write_text(json.dumps(merged, indent=1, default=str))
    write_markdown(merged, args.out / "kv.md")
    plots(merged, args.out)
    print(f"merged {len(reports)} runs into {args.out / 'kv.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
