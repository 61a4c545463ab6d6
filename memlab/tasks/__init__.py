"""Tasks: data and metric per task. Importing this package imports every module in it, so each
task's ``@register_task`` decorator runs: adding a task is adding its file."""

import importlib
import pkgutil

from memlab.tasks.base import (
    IGNORE_INDEX,
    TASKS,
    Task,
    TaskConfig,
    TokenData,
    accuracy,
    build,
    count_correct,
    names,
    register_task,
)

_SHARED = {"base"}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _SHARED and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "Task",
    "TaskConfig",
    "TokenData",
    "accuracy",
    "build",
    "count_correct",
    "names",
    "register_task",
]
