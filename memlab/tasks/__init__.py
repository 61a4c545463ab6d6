"""Tasks: data and metric per task. Importing this package imports every module in it, so each
task's ``@register_task`` decorator runs: adding a task is adding its file."""

from memlab.registry import import_submodules
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

import_submodules(__name__, __path__, skip={"base"})

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
