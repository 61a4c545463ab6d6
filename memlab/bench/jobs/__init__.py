"""Run kinds. Importing this package imports every module in it, so each kind's
``@register_job`` decorator runs: adding a kind (issue 4's ``kv_niah``) is adding its file."""


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
from memlab.registry import import_submodules

import_submodules(__name__, __path__, skip={"base"})

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
