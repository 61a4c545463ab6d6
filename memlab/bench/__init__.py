"""Measurement: suites expand into runs (runner), runs record metrics (measure) in SQLite (store),
and the store becomes tables and plots (report)."""

from memlab.bench.jobs import JOBS, Job, Overrides, RunContext, register_job
from memlab.bench.report import write_report
from memlab.bench.runner import expand_suite, load_suite, run_suite, suite_names
from memlab.bench.store import DEFAULT_STORE, RunRecord, Store

__all__ = [
    "DEFAULT_STORE",
    "JOBS",
    "Job",
    "Overrides",
    "RunContext",
    "RunRecord",
    "Store",
    "expand_suite",
    "load_suite",
    "register_job",
    "run_suite",
    "suite_names",
    "write_report",
]
