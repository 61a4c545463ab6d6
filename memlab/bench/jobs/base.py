"""Run kinds: what one row of a suite section does.

A suite section names its kind (``job = "mqar"``). The kind turns the section's TOML table into
run configs (``expand``), runs one config (``run``) and knows how to summarize and report its
runs. Everything else (ids, resume, the store, failures, environment) is the runner's, so a new
kind (issue 4's ``kv_niah``) is one file in this folder with one ``@register_job``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from memlab.bench.report import ReportSection, Table, format_value
from memlab.bench.store import RunRecord
from memlab.registry import Registry

JOBS: Registry[type[Job]] = Registry("job kind")


@dataclass(frozen=True)
class Overrides:
    """Suite-wide overrides from the command line (tests and smoke runs make suites smaller).

    They become part of each run's config, so an overridden run never masquerades as the real one.
    """

    epochs: int | None = None  # every run trains this many epochs
    max_examples: int | None = None  # every data set holds at most this many examples

    def __post_init__(self) -> None:
        for name in ("epochs", "max_examples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} override must be a positive int, got {value!r}")


@dataclass
class RunContext:
    """What a job's ``run`` gets from the runner besides its config."""

    device: torch.device
    progress: bool = True
    log: Callable[[str], None] = print
    extras: dict[str, Any] = field(default_factory=dict)


class Job:
    """Base class of a run kind. Subclasses implement ``expand`` and ``run``."""

    name: ClassVar[str] = ""

    def expand(self, table: dict[str, Any], *, where: str, overrides: Overrides) -> list[dict[str, Any]]:
        """The section's run configs: JSON-able dicts, each one run.

        ``where`` names the section (``"quick.toml [mqar]"``) for error messages. Unknown keys,
        unknown mixers or tasks and bad values must raise ValueError here, before anything runs.
        """
        raise NotImplementedError

    def describe(self, config: dict[str, Any]) -> str:
        """A short human name of one run (shown in progress lines, matched by ``--filter``)."""
        return ", ".join(
            f"{k}={format_value(v)}" for k, v in config.items() if not isinstance(v, (dict, list))
        )

    def run(self, config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
        """Run one config and return its metrics (a JSON-able dict)."""
        raise NotImplementedError

    def headline(self, metrics: dict[str, Any]) -> str:
        """One line about a finished run's result, logged by the runner."""
        return ""

    def notes(self) -> list[str]:
        """Messages from the last ``expand`` (e.g. skipped optional mixers)."""
        return []

    def summary(self, records: list[RunRecord]) -> Table:
        """The table ``memlab run`` prints at the end: here one row per finished run."""
        done = [r for r in records if r.status == "done"]
        keys = sorted({k for r in done for k, v in (r.metrics or {}).items() if isinstance(v, (int, float))})
        rows = [[r.name, *[format_value((r.metrics or {}).get(k)) for k in keys]] for r in done]
        return Table(title=f"{self.name} runs", columns=["run", *keys], rows=rows)

    def report(self, records: list[RunRecord], out_dir: Path, prefix: str) -> list[ReportSection]:
        """Report sections for this kind's runs of one (suite, section); PNGs go to ``out_dir``
        with names starting with ``prefix``."""
        return [ReportSection(title=f"{self.name}", tables=[self.summary(records)])]


def register_job(name: str) -> Callable[[type[Job]], type[Job]]:
    """Class decorator: add a Job subclass to the registry under ``name``."""

    def deco(cls: type[Job]) -> type[Job]:
        cls.name = name
        return JOBS.register(name)(cls)

    return deco


def build_job(name: str) -> Job:
    return JOBS.get(name)()


# -- helpers for expanding TOML tables ------------------------------------------------------
def check_keys(table: Any, allowed: set[str], where: str, required: set[str] = frozenset()) -> None:
    """Raise ValueError naming unknown or missing keys of a suite table."""
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a table, got {type(table).__name__} {table!r}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; expected a subset of {sorted(allowed)}")
    missing = sorted(required - set(table))
    if missing:
        raise ValueError(f"missing key(s) {missing} in {where}")


def as_axis(value: Any, where: str) -> list[Any]:
    """A grid axis: a non-empty list, or a scalar meaning a one-value axis."""
    if isinstance(value, dict):
        raise ValueError(f"{where} must be a value or a list of values, got a table {value!r}")
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{where} must list at least one value, got []")
        return value
    return [value]


def flatten_axes(table: dict[str, Any], where: str, prefix: str = "") -> dict[str, list[Any]]:
    """Nested sweep table -> {dotted path: values}; every leaf must be a non-empty list."""
    out: dict[str, list[Any]] = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_axes(value, where, f"{path}."))
        elif isinstance(value, list) and value:
            out[path] = value
        else:
            raise ValueError(f"{where}: sweep axis {path!r} must be a non-empty list, got {value!r}")
    return out


def grid(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes, first axis outermost; ``{}`` gives one empty combination."""
    names = list(axes)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes.values())]
