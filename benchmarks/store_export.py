"""Export the runs of memlab stores (SQLite) to one JSON file for `benchmarks/results/`.

    python benchmarks/store_export.py --suite passkey_h200 --out F.json --note "what ran, where" S1.sqlite ...

Several stores (or earlier exports, ``*.json``) may be given, oldest first: a run id met again
replaces the earlier row (a rerun of the same configuration), and every row records the file it
came from in ``source``. NaN and infinite metrics (a diverged loss) are written as the strings
"nan" / "inf", as the store keeps them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memlab.bench.store import RunRecord, Store, json_safe  # noqa: E402


def _rows(path: Path, suite: str | None) -> list[dict[str, Any]]:
    if path.suffix == ".json":
        runs = json.loads(path.read_text())["runs"]
        return [r for r in runs if suite is None or r.get("suite") == suite]
    if not path.is_file():
        raise FileNotFoundError(f"store {str(path)!r} does not exist")
    with Store(path) as store:
        return [dataclasses.asdict(r) for r in store.records(suite=suite)]


def export(paths: list[Path], suite: str | None, note: str) -> dict[str, Any]:
    """Rows of every store in ``paths`` (later files win per run id), as one JSON-ready dict."""
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        for row in _rows(path, suite):
            row = dict(row)
            row.setdefault("source", path.name)
            merged[row["id"]] = row
    devices = sorted({(r.get("env") or {}).get("device_name") or r.get("device") or "?"
                      for r in merged.values()})
    return {"benchmark": suite or "all suites", "command": note, "device": ", ".join(devices),
            "runs": json_safe(list(merged.values()))}


def write_store(runs: list[dict[str, Any]], path: Path) -> None:
    """The merged runs as a fresh SQLite store, for `memlab report --store PATH`."""
    if path.exists():
        raise FileExistsError(f"--sqlite {str(path)!r} exists; pass a new path")
    cols = [f.name for f in dataclasses.fields(RunRecord)]
    with Store(path) as store:
        store.insert([RunRecord(**{c: run[c] for c in cols}) for run in runs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+", type=Path, help="SQLite stores or earlier exports, oldest first")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--suite", default=None, help="only this suite's runs")
    ap.add_argument("--note", default="", help="how the runs were made (command, machine, date)")
    ap.add_argument("--sqlite", type=Path, default=None, help="also write the merged runs as a new store")
    args = ap.parse_args()
    payload = export(args.stores, args.suite, args.note)
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {len(payload['runs'])} runs to {args.out}")
    if args.sqlite is not None:
        write_store(json.loads(json.dumps(payload["runs"])), args.sqlite)
        print(f"wrote the store {args.sqlite} (memlab report --store {args.sqlite})")


if __name__ == "__main__":
    main()
