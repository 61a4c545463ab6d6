"""Suites -> runs -> the store.

A suite is a TOML file (``memlab/suites/<name>.toml`` or any path). Its ``[suite]`` table holds
metadata; every other top-level table is a section whose ``job`` key names a run kind
(``bench/jobs``). The kind expands the section's grid into run configs; the runner gives each
run a stable id (a hash of its full config, suite and section included), skips runs the store
already has as done, and records the rest one by one: ``running`` -> ``done`` with metrics, or
``failed`` with the traceback while the suite goes on. Ctrl-C marks the current run
``interrupted``; SIGKILL leaves it ``running`` with a dead pid. Both are re-run next time.

Under torchrun (``WORLD_SIZE`` > 1) each rank takes every WORLD_SIZE-th run of the full list,
so ranks never share a run and resume still works per run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import tomllib
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memlab.bench.jobs import JOBS, Overrides, RunContext, build_job, check_keys
from memlab.bench.measure import environment
from memlab.bench.report import Table
from memlab.bench.store import Store

SUITES_DIR = Path(__file__).resolve().parents[1] / "suites"
SUITE_META_KEYS = {"description", "cpu_threads"}


@dataclass
class Section:
    name: str
    job: str
    table: dict[str, Any]


@dataclass
class Suite:
    name: str
    path: Path
    description: str
    sections: list[Section]
    # torch threads for runs on a CPU (None: torch's default). Small models gain little from a
    # second thread, and OpenMP threads that spin while a core is busy elsewhere can make a run
    # ten times slower on a shared 2-core machine.
    cpu_threads: int | None = None


@dataclass
class RunSpec:
    """One run: its id, where it comes from, and the config its job receives."""

    id: str
    suite: str
    section: str
    job: str
    name: str
    config: dict[str, Any]


@dataclass
class SuiteResult:
    suite: str
    planned: int = 0  # runs in this invocation's share of the suite (after --filter)
    already_done: int = 0  # skipped: finished earlier (or running elsewhere)
    done: int = 0
    failed: int = 0
    failed_names: list[str] = field(default_factory=list)
    interrupted: bool = False
    stopped_by_time: bool = False  # --stop-after ran out before every pending run started
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


# -- suites -------------------------------------------------------------------------------
def suite_names() -> list[str]:
    """Suites shipped in memlab/suites."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.toml"))


def find_suite(name_or_path: str | os.PathLike[str]) -> Path:
    """A suite by name (memlab/suites/<name>.toml) or by path to a .toml file."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix == ".toml" or os.sep in text or "/" in text:
        if not path.is_file():
            raise ValueError(f"suite file {text!r} does not exist")
        return path
    candidate = SUITES_DIR / f"{text}.toml"
    if not candidate.is_file():
        raise ValueError(f"unknown suite {text!r}; expected one of {suite_names()} or a path to a .toml file")
    return candidate


def load_suite(name_or_path: str | os.PathLike[str]) -> Suite:
    """Parse a suite file; malformed TOML, unknown keys and unknown job kinds raise ValueError."""
    path = find_suite(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"suite {str(path)!r} is not valid TOML: {exc}") from exc
    meta = data.pop("suite", {})
    check_keys(meta, SUITE_META_KEYS, f"{path.name} [suite]")
    sections = []
    for name, table in data.items():
        where = f"{path.name} [{name}]"
        if not isinstance(table, dict):
            raise ValueError(f"{where}: top-level key {name!r} must be a section table, got {table!r}")
        if "job" not in table:
            raise ValueError(f"{where}: a section needs job = one of {JOBS.names()}")
        if table["job"] not in JOBS:
            raise ValueError(f"{where}: unknown job kind {table['job']!r}; expected one of {JOBS.names()}")
        sections.append(Section(name=name, job=table["job"], table=table))
    if not sections:
        raise ValueError(f"suite {str(path)!r} has no sections; add a table with job = ...")
    threads = meta.get("cpu_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"{path.name} [suite] cpu_threads must be a positive int, got {threads!r}")
    return Suite(
        name=path.stem,
        path=path,
        description=str(meta.get("description", "")),
        sections=sections,
        cpu_threads=threads,
    )


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def run_id(config: dict[str, Any]) -> str:
    """Stable id of a run: the first 16 hex digits of the SHA-256 of its canonical JSON config."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def expand_suite(suite: Suite, overrides: Overrides | None = None) -> tuple[list[RunSpec], list[str]]:
    """Every run of the suite in a fixed order, plus notes (e.g. optional mixers skipped)."""
    overrides = overrides or Overrides()
    specs: list[RunSpec] = []
    notes: list[str] = []
    seen: dict[str, str] = {}
    for section in suite.sections:
        job = build_job(section.job)
        configs = job.expand(section.table, where=f"{suite.path.name} [{section.name}]", overrides=overrides)
        notes += job.notes()
        for config in configs:
            full = {"suite": suite.name, "section": section.name, "job": section.job, **config}
            rid = run_id(full)
            name = f"{section.name}: {job.describe(config)}"
            if rid in seen:
                raise ValueError(f"suite {suite.name!r} lists the same run twice: {name!r} and {seen[rid]!r}")
            seen[rid] = name
            specs.append(
                RunSpec(
                    id=rid, suite=suite.name, section=section.name, job=section.job, name=name, config=full
                )
            )
    return specs, notes


def select_runs(specs: list[RunSpec], pattern: str | None, suite: str) -> list[RunSpec]:
    """``select``, but a pattern that keeps none of the suite's runs is an error naming it.

    A filter that matches nothing is almost always a typo; running zero runs and exiting 0 would
    hide it (and under torchrun every rank would silently do nothing).
    """
    chosen = select(specs, pattern)
    if pattern is not None and specs and not chosen:
        raise ValueError(
            f"--filter {pattern!r} matches none of the {len(specs)} runs of suite {suite!r} "
            "(it keeps runs whose name contains it, case-insensitive, or whose id starts with it; "
            "see `memlab run SUITE --dry-run` for the names)"
        )
    return chosen


def select(specs: list[RunSpec], pattern: str | None) -> list[RunSpec]:
    """Runs whose name contains ``pattern`` (case-insensitive) or whose id starts with it.

    A comma separates alternatives: ``"titans,mamba"`` keeps the runs that match either.
    """
    if not pattern:
        return specs
    alternatives = [p.strip().lower() for p in pattern.split(",") if p.strip()]
    return [
        s for s in specs if any(p in s.name.lower() or s.id.startswith(p) for p in alternatives)
    ]


# -- running ------------------------------------------------------------------------------
def run_suite(
    suite: Suite,
    store: Store,
    *,
    device: torch.device,
    limit: int | None = None,
    pattern: str | None = None,
    overrides: Overrides | None = None,
    progress: bool = True,
    retry_failed: bool = True,
    rank: int = 0,
    world_size: int = 1,
    threads: int | None = None,
    stop_after: float | None = None,
    log: Callable[[str], None] = print,
) -> SuiteResult:
    """Run every pending run of the suite (at most ``limit`` of them) and record each in the store.

    Exceptions inside a run (including CUDA out-of-memory) are stored as failed runs and the suite
    goes on; KeyboardInterrupt marks the run interrupted and propagates. On a CPU, torch uses
    ``threads`` threads, else the suite's ``cpu_threads``, else torch's default. ``stop_after``
    (seconds): start no run once that much time has passed since the suite started, so that a
    machine lent for a fixed time is not killed in the middle of a run; the rest stay pending.
    Several processes on one store share the pending runs: each claims the next free one.
    """
    if stop_after is not None and (
        isinstance(stop_after, bool) or not isinstance(stop_after, (int, float)) or not stop_after >= 0
    ):
        raise ValueError(f"stop_after must be None or a number of seconds >= 0, got {stop_after!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int, got {limit!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    t0 = time.perf_counter()
    specs, notes = expand_suite(suite, overrides)
    specs = select_runs(specs, pattern, suite.name)[rank::world_size]
    result = SuiteResult(suite=suite.name, planned=len(specs), notes=notes)
    for note in notes:
        log(f"note: {note}")
    n_threads = threads if threads is not None else suite.cpu_threads
    if device.type == "cpu" and n_threads is not None:
        torch.set_num_threads(n_threads)
    env = environment(device)  # after set_num_threads: the device name records the thread count
    jobs = {name: build_job(name) for name in {s.job for s in specs}}
    ctx = RunContext(device=device, progress=progress, log=log)
    started = 0
    for i, spec in enumerate(specs):
        if limit is not None and started >= limit:
            break
        if stop_after is not None and time.perf_counter() - t0 >= stop_after:
            result.stopped_by_time = True
            log(f"stop-after: {stop_after:g} s passed, no new run started")
            break
        claimed = store.claim(
            run_id=spec.id,
            suite=spec.suite,
            section=spec.section,
            job=spec.job,
            name=spec.name,
            config=spec.config,
            seed=spec.config.get("seed"),
            device=str(device),
            env=env,
            retry_failed=retry_failed,
        )
        if not claimed:
            result.already_done += 1
            continue
        started += 1
        log(f"[{i + 1}/{len(specs)}] {spec.name}  ({spec.id})")
        t_run = time.perf_counter()
        job_config = {k: v for k, v in spec.config.items() if k not in ("suite", "section", "job")}
        try:
            metrics = jobs[spec.job].run(job_config, ctx)
            canonical_json(metrics)  # a metric that cannot be stored is the run's failure, not the suite's
        except KeyboardInterrupt:
            store.fail(spec.id, traceback.format_exc(), interrupted=True)
            result.interrupted = True
            result.wall_s = time.perf_counter() - t0
            raise
        except Exception as exc:  # any failure of one run is recorded; the suite goes on
            store.fail(spec.id, traceback.format_exc())
            result.failed += 1
            result.failed_names.append(spec.name)
            log(f"  failed: {type(exc).__name__}: {exc}")
            if device.type == "cuda":
                torch.cuda.empty_cache()  # an OOM must not starve the runs after it
        else:
            store.finish(spec.id, metrics)
            result.done += 1
            line = jobs[spec.job].headline(metrics)
            log(f"  done in {time.perf_counter() - t_run:.1f} s" + (f": {line}" if line else ""))
    result.wall_s = time.perf_counter() - t0
    return result


def summary_tables(store: Store, suite: str) -> list[Table]:
    """The per-section tables ``memlab run`` prints at the end (best lr per mixer for MQAR)."""
    tables = []
    records = store.records(suite=suite)
    for section in dict.fromkeys((r.section, r.job) for r in records):
        recs = [r for r in records if (r.section, r.job) == section]
        if section[1] in JOBS:
            table = build_job(section[1]).summary(recs)
            table.title = f"{suite} [{section[0]}] {table.title}"
            tables.append(table)
    return tables


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) when not under torchrun."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ValueError(
            f"RANK and WORLD_SIZE must be integers, got RANK={os.environ.get('RANK')!r} "
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}"
        ) from exc
