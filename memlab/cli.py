"""The ``memlab`` command: ``run`` a suite into the store, ``report`` the store, ``list`` what exists.

    memlab run SUITE [--store PATH] [--device auto|cpu|cuda|cuda:N] [--limit N] [--filter SUBSTR]
                     [--epochs N] [--max-examples N] [--threads N] [--no-progress] [--skip-failed]
                     [--stop-after SECONDS] [--strict] [--dry-run]
    memlab report [--store PATH] [--out DIR] [--suite NAME]
    memlab list

Exit status: 0 on success, 1 when ``--strict`` and a run failed, 2 for bad input (unknown suite,
mixer, task, config key ...), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table as RichTable

from memlab.bench.report import Table


def _console() -> Console:
    # Wide enough that tables in logs and CI output are not folded into unreadable columns.
    return Console(width=max(Console().width, 140))


def _print_table(console: Console, table: Table) -> None:
    rt = RichTable(title=table.title, title_justify="left", header_style="bold")
    for i, col in enumerate(table.columns):
        rt.add_column(str(col), justify="left" if i == 0 else "right", overflow="fold")
    from memlab.bench.report import format_value

    for row in table.rows:
        rt.add_row(*[v if isinstance(v, str) else format_value(v) for v in row])
    console.print(rt)
    if table.note:
        console.print(table.note)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from memlab.bench.store import DEFAULT_STORE

    parser = argparse.ArgumentParser(
        prog="memlab", description="memory in attention: run benchmark suites, report them, list what exists"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a suite (skips runs already done in the store)")
    run.add_argument("suite", help="suite name (see `memlab list`) or path to a .toml file")
    run.add_argument("--store", default=str(DEFAULT_STORE), help=f"SQLite store (default {DEFAULT_STORE})")
    run.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    run.add_argument("--limit", type=_non_negative_int, default=None, help="run at most N pending runs")
    run.add_argument(
        "--filter",
        default=None,
        help="only runs whose name contains SUBSTR (or id starts with it); A,B keeps runs matching either",
    )
    run.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="override every run's epochs (a smoke test; overridden runs get their own ids)",
    )
    run.add_argument(
        "--max-examples",
        type=_positive_int,
        default=None,
        help="cap every data set at N examples (a smoke test; such runs get their own ids)",
    )
    run.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch threads on a CPU (default: the suite's cpu_threads, else torch's default)",
    )
    run.add_argument(
        "--stop-after",
        type=_non_negative_float,
        default=None,
        metavar="SECONDS",
        help="start no new run after SECONDS (for a machine lent for a fixed time); the rest stay pending",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--skip-failed", action="store_true", help="do not retry runs that failed before")
    run.add_argument("--strict", action="store_true", help="exit with status 1 when a run fails")
    run.add_argument("--dry-run", action="store_true", help="list the runs and their status, run nothing")

    rep = sub.add_parser("report", help="write index.html, results.md and PNG plots from the store")
    rep.add_argument("--store", default=str(DEFAULT_STORE), help=f"SQLite store (default {DEFAULT_STORE})")
    rep.add_argument("--out", default="runs/report", help="output folder (default runs/report)")
    rep.add_argument("--suite", default=None, help="only this suite's runs")

    sub.add_parser("list", help="list mixers, tasks, run kinds and suites")

    from memlab.kvcache.cli import add_calibrate_parser, add_kv_parser

    add_kv_parser(sub)
    add_calibrate_parser(sub)
    return parser


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from pathlib import Path

    from memlab.bench.jobs import Overrides
    from memlab.bench.measure import device_name, resolve_device
    from memlab.bench.runner import (
        distributed_rank,
        expand_suite,
        load_suite,
        run_suite,
        select_runs,
        summary_tables,
    )
    from memlab.bench.store import Store

    suite = load_suite(args.suite)
    overrides = Overrides(epochs=args.epochs, max_examples=args.max_examples)
    rank, world = distributed_rank()
    if args.dry_run:
        specs, notes = expand_suite(suite, overrides)
        specs = select_runs(specs, args.filter, suite.name)[rank::world]
        status: dict[str, str] = {}
        if Path(args.store).is_file():
            with Store(args.store) as store:
                status = {r.id: r.status for r in store.records(suite=suite.name)}
        for note in notes:
            console.print(f"note: {note}")
        rows = [[s.name, s.id, status.get(s.id, "pending")] for s in specs]
        _print_table(
            console,
            Table(title=f"suite {suite.name}: {len(specs)} runs", columns=["run", "id", "status"], rows=rows),
        )
        return 0
    device = resolve_device(args.device)
    threads = args.threads if args.threads is not None else suite.cpu_threads
    if device.type == "cpu" and threads is not None:
        import torch

        torch.set_num_threads(threads)  # before the header below names the thread count
    console.print(
        f"suite {suite.name} ({suite.path}) on {device} [{device_name(device)}], store {args.store}"
    )
    with Store(args.store) as store:
        try:
            result = run_suite(
                suite,
                store,
                device=device,
                limit=args.limit,
                pattern=args.filter,
                overrides=overrides,
                progress=not args.no_progress,
                retry_failed=not args.skip_failed,
                rank=rank,
                world_size=world,
                threads=args.threads,
                stop_after=args.stop_after,
                log=lambda msg: console.print(msg, markup=False, highlight=False),
            )
        except KeyboardInterrupt:
            console.print("interrupted: the current run is marked interrupted and will run again next time")
            return 130
        if rank == 0:
            for table in summary_tables(store, suite.name):
                _print_table(console, table)
    console.print(
        f"{result.done} runs done, {result.failed} failed, {result.already_done} already done "
        f"of {result.planned} in {result.wall_s:.1f} s"
    )
    for name in result.failed_names:
        console.print(f"  failed: {name} (see `memlab report` for the traceback)")
    if result.stopped_by_time:
        console.print(f"--stop-after {args.stop_after:g} s reached: pending runs start on the next call")
    return 1 if args.strict and result.failed else 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from memlab.bench.report import write_report

    paths = write_report(args.store, args.out, suite=args.suite)
    console.print(f"wrote {paths.index}, {paths.markdown} and {len(paths.figures)} plots")
    return 0


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    from memlab import mixers, tasks
    from memlab.bench.jobs import JOBS
    from memlab.bench.runner import expand_suite, load_suite, suite_names

    def options(cfg_cls: type, skip: set[str]) -> str:
        parts = []
        for f in dataclasses.fields(cfg_cls):
            if f.name in skip:
                continue
            default = f.default if f.default is not dataclasses.MISSING else "required"
            parts.append(f"{f.name}={default}")
        return ", ".join(parts)

    rows = []
    for name in mixers.names():
        cls = mixers.MIXERS.get(name)
        rows.append(
            [name, "constant" if cls.constant_state else "grows with T", options(cls.Config, {"d_model"})]
        )
    _print_table(console, Table(title="mixers", columns=["name", "state", "options (defaults)"], rows=rows))
    rows = [[name, options(tasks.TASKS.get(name).Config, set())] for name in tasks.names()]
    _print_table(console, Table(title="tasks", columns=["name", "options (defaults)"], rows=rows))
    rows = [[name, ((JOBS.get(name).__doc__ or "").strip().splitlines() or [""])[0]] for name in JOBS.names()]
    _print_table(console, Table(title="run kinds", columns=["job", "what a run does"], rows=rows))
    rows = []
    for name in suite_names():
        try:
            suite = load_suite(name)
            specs, _ = expand_suite(suite)
            rows.append([name, str(len(specs)), suite.description])
        except ValueError as exc:
            rows.append([name, "error", str(exc)])
    _print_table(console, Table(title="suites", columns=["name", "runs", "description"], rows=rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = _console()
    commands = {"run": cmd_run, "report": cmd_report, "list": cmd_list}
    try:
        if args.command in commands:
            return commands[args.command](args, console)
        return args.func(args)  # kv / calibrate: their parsers bind the function
    except ValueError as exc:
        console.print(f"error: {exc}", style="bold red", markup=False, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
