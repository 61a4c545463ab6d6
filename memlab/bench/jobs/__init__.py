"""Run kinds. Importing this package imports every module in it, so each kind's
``@register_job`` decorator runs: adding a kind (issue 4's ``kv_niah``) is adding its file."""

import importlib
import pkgutil

from memlab.bench.jobs.base import (
    JOBS,
    Job,
    Overrides,
    RunContext,
    as_axis,
    build_job,
    check_keys,
    flatten_axes,
    grid,
    register_job,
)

_SHARED = {"base"}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _SHARED and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "JOBS",
    "Job",
    "Overrides",
    "RunContext",
    "as_axis",
    "build_job",
    "check_keys",
    "flatten_axes",
    "grid",
    "register_job",
]
